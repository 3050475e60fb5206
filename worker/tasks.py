"""The Celery task: a turn of this worker (see ``worker.runner``). Only a job id travels, as a
hint; everything else is read from the store."""

from __future__ import annotations

import logging

from celery.signals import worker_ready

from jobs.queue import TASK_NAME
from jobs.settings import get_settings
from worker.celery_app import app
from worker.runner import run_job

log = logging.getLogger("clcalib.worker")


@app.task(name=TASK_NAME, bind=True, acks_late=True, ignore_result=True)
def calibrate(self, job_id: str) -> str:
    return run_job(job_id, get_settings(), self.request.hostname or "worker")


@worker_ready.connect
def _import_torch_once(**_):
    """The worker imports torch once, when it starts (solo pool: no fork after this)."""
    s = get_settings()
    import torch

    import clcalib.pipeline  # noqa: F401

    if s.torch_threads:
        torch.set_num_threads(s.torch_threads)
    log.info("worker ready: device=%s torch=%s threads=%d", s.device, torch.__version__, torch.get_num_threads())

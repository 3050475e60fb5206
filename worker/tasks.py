"""The Celery task: a turn of this worker (see ``worker.runner``). Only a job id travels, as a
hint; everything else is read from the store."""

from __future__ import annotations

import logging

from celery.exceptions import Reject
from celery.signals import worker_ready, worker_shutting_down

from jobs.queue import TASK_NAME, send_job
from jobs.settings import get_settings
from worker.celery_app import app
from worker.runner import request_hand_back, run_job, stop_requested

log = logging.getLogger("clcalib.worker")


@app.task(name=TASK_NAME, bind=True, acks_late=True, ignore_result=True)
def calibrate(self, job_id: str) -> str:
    if stop_requested():  # a stopping worker's last drain of the queue (the file queue does one): not ours
        raise Reject("this worker is stopping", requeue=True)
    s = get_settings()
    return run_job(job_id, s, self.request.hostname or "worker", enqueue=lambda jid: send_job(self.app, s, jid))


@worker_shutting_down.connect
def _hand_back_on_stop(sig=None, how=None, **_):
    """Celery's warm shutdown would wait for the running job (hours, for a long one; compose kills
    the worker after its grace period): the job goes back to the queue instead. Runs in the
    signal handler."""
    request_hand_back(f"{sig}, {how.lower() if how else 'warm'} shutdown")


@worker_ready.connect
def _start_first_child(**_):
    """The calibration zygote starts now (it imports torch); this process never does."""
    from jobs.sandbox import landlock_abi
    from worker.runner import store_for, warm_up
    from worker.workspace import clear_stale

    s = get_settings()
    warm_up()
    try:
        for name in clear_stale(s.scratch, store_for(s)):
            log.info("removed scratch folder %s left by an earlier worker", name)
    except Exception as e:  # the store not reachable yet: the folders go at the next start
        log.warning("scratch folders not checked: %s", e)
    log.info("worker ready: device=%s sandbox=%s (landlock ABI %d), memory cap %.1f GiB", s.device, s.sandbox,
             landlock_abi(), s.worker_memory_bytes / 2**30)


"""Enqueue job ids, read the queue depth, check the broker: the API's view of Celery."""

from __future__ import annotations

import logging

from jobs.queue import TASK_NAME, ensure_queue_dirs, make_celery
from jobs.settings import Settings

log = logging.getLogger("clcalib.service")


class Broker:
    def __init__(self, settings: Settings):
        self.s = settings
        ensure_queue_dirs(settings)
        self.celery = make_celery(settings)

    def enqueue(self, job_id: str) -> None:
        """Send the job id. Raises if the broker cannot be reached (the caller keeps the job
        queued in the store; the sweeper sends it later)."""
        self.celery.send_task(
            TASK_NAME, args=[job_id], queue=self.s.queue_name,
            retry=True, retry_policy={"max_retries": 2, "interval_start": 0.2,
                                      "interval_step": 0.5, "interval_max": 1.0},
        )

    def depth(self) -> int:
        with self.celery.connection_for_read() as conn:
            conn.ensure_connection(max_retries=1, timeout=3)
            ch = conn.default_channel
            return int(ch.queue_declare(queue=self.s.queue_name, passive=False, durable=True,
                                        auto_delete=False).message_count)

    def ping(self) -> None:
        with self.celery.connection_for_read() as conn:
            conn.ensure_connection(max_retries=1, timeout=3)

"""Enqueue job ids, read the queue depth, check the broker: the API's view of Celery."""

from __future__ import annotations

import logging

from jobs.queue import ensure_queue_dirs, make_celery, send_job
from jobs.settings import Settings

log = logging.getLogger("clcalib.service")


class Broker:
    def __init__(self, settings: Settings):
        self.s = settings
        ensure_queue_dirs(settings)
        self.celery = make_celery(settings)

    def enqueue(self, job_id: str) -> None:
        """Send the job id (``jobs.queue.send_job``)."""
        send_job(self.celery, self.s, job_id)

    def depth(self) -> int:
        with self.celery.connection_for_read() as conn:
            conn.ensure_connection(max_retries=1, timeout=3)
            ch = conn.default_channel
            return int(ch.queue_declare(queue=self.s.queue_name, passive=False, durable=True,
                                        auto_delete=False).message_count)

    def ping(self) -> None:
        with self.celery.connection_for_read() as conn:
            conn.ensure_connection(max_retries=1, timeout=3)

"""The sweeper: one background thread in every API process.

Each pass: re-queue running jobs whose worker stopped heartbeating (or fail them after
``max_attempts``), send queued jobs whose message never reached the broker or was lost,
delete the files of jobs past the retention period, and remove orphaned job folders.
All store changes are conditional updates, so several API replicas may sweep at once.
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("clcalib.service")


class Sweeper:
    def __init__(self, settings, store, storage, broker):
        self.s, self.store, self.storage, self.broker = settings, store, storage, broker
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.passes = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="clcalib-sweeper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sweep()
            except Exception:
                log.exception("sweep failed; retrying next period")
            self._stop.wait(self.s.sweep_interval_s)

    def _send(self, ids: list[str], why: str) -> None:
        for job_id in ids:
            try:
                self.broker.enqueue(job_id)
                self.store.mark_enqueued(job_id)
                log.warning("job %s sent to the queue again: %s", job_id, why)
            except Exception as e:
                log.warning("job %s could not be sent (%s); next sweep retries", job_id, e)
                return

    def sweep(self) -> None:
        s = self.s
        requeued, failed = self.store.reap_stale(stale_after_s=s.stale_after_s, max_attempts=s.max_attempts)
        for job_id in failed:
            log.error("job %s failed: its worker was lost %d times", job_id, s.max_attempts)
        self._send(requeued, "its worker stopped heartbeating")
        self._send(self.store.queued_not_enqueued(older_than_s=2.0), "never reached the broker")
        # messages lost by the broker (e.g. a Redis without persistence restarted): the queue
        # is empty but the store still has queued jobs that were sent a while ago
        grace = max(3 * s.sweep_interval_s, 10.0)
        old_queued = self.store.queued_ids(older_than_s=grace)
        if old_queued:
            try:
                depth = self.broker.depth()
            except Exception as e:
                log.warning("broker unavailable for the sweep: %s", e)
                depth = None
            if depth == 0:
                self._send(old_queued, "the broker queue was empty")
        if s.retention_days > 0:  # 0: keep forever
            for job_id in self.store.expired(s.retention_days * 86400):
                self.storage.delete_job(job_id)
                self.store.mark_files_deleted(job_id)
                log.info("job %s: files deleted after %.1f days of retention", job_id, s.retention_days)
        if self.passes % 20 == 0:
            known = self.store.all_ids()
            horizon = time.time() - max(3600.0, 2 * s.validate_timeout_s)
            for job_id in self.storage.job_ids_on_disk() - known:
                d = self.storage.job_dir(job_id)
                if d.stat().st_mtime < horizon:
                    self.storage.delete_job(job_id)
                    log.info("removed orphaned folder of job %s", job_id)
        self.passes += 1

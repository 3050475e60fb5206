"""The sweeper: one background thread in every API process.

Each pass: re-queue running jobs whose worker stopped heartbeating (or fail them after
``max_attempts``), fail jobs past the maximum run time, send queued jobs whose message never
reached the broker, restore messages the broker lost, delete the files of jobs past the
retention period, and remove orphaned job folders.

Messages are turns, not jobs (``Store.claim_next``): a worker that takes one runs the fairest
queued job. So a lost message is made good by comparing counts, per pass, whatever the load:
fewer messages waiting than queued jobs means some were lost, and the difference is sent again.
A message too many costs a worker one query.
All store changes are conditional updates, so several API replicas may sweep at once.
"""

from __future__ import annotations

import logging
import threading

from jobs.objects import LocalObjects, ObjectStoreError
from service.deps import delete_job_files

log = logging.getLogger("clcalib.service")


class Sweeper:
    def __init__(self, settings, store, storage, broker, objects=None):
        """``objects``: where the jobs' bytes live (default: ``storage``'s data folder)."""
        self.s, self.store, self.storage, self.broker = settings, store, storage, broker
        self.objects = objects if objects is not None else LocalObjects(storage.root)
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

    def _restore_lost(self) -> None:
        """Messages lost by the broker (a Redis without persistence restarted, a message dropped
        under load): fewer waiting than queued jobs. Only once a queued job has waited past a
        grace period, so messages still on their way are not counted as lost."""
        grace = max(3 * self.s.sweep_interval_s, 10.0)
        if not self.store.queued_ids(older_than_s=grace):
            return
        try:
            depth = self.broker.depth()
        except Exception as e:
            log.warning("broker unavailable for the sweep: %s", e)
            return
        queued = self.store.queued_ids()
        missing = len(queued) - depth
        if missing > 0:
            self._send(queued[:missing], f"{missing} of {len(queued)} queued jobs had no message "
                       f"({depth} waiting in the broker)")

    def sweep(self) -> None:
        s = self.s
        requeued, failed = self.store.reap_stale(stale_after_s=s.stale_after_s, max_attempts=s.max_attempts)
        for job_id in failed:
            log.error("job %s failed: its worker was lost %d times", job_id, s.max_attempts)
        self._send(requeued, "its worker stopped heartbeating")
        for job_id in self.store.fail_overdue(s.max_job_runtime_s):
            log.error("job %s failed: it ran longer than %.0fs", job_id, s.max_job_runtime_s)
        self._send(self.store.queued_not_enqueued(older_than_s=2.0), "never reached the broker")
        self._restore_lost()
        if s.retention_days > 0:  # 0: keep forever
            for job_id in self.store.expired(s.retention_days * 86400):
                if not delete_job_files(self.storage, self.objects, job_id):
                    break  # the object store is down: the next pass
                self.store.mark_files_deleted(job_id)
                log.info("job %s: files deleted after %.1f days of retention", job_id, s.retention_days)
        if self.passes % 20 == 0:
            known = self.store.all_ids()
            horizon = self.store.clock() - max(3600.0, 2 * s.validate_timeout_s)
            for job_id in self.storage.job_ids_on_disk() - known:  # uploads staged by a submit that died
                d = self.storage.job_dir(job_id)
                if d.stat().st_mtime < horizon:
                    self.storage.delete_job(job_id)
                    log.info("removed orphaned folder of job %s", job_id)
            if self.objects.kind != "local":  # objects of deleted jobs whose delete failed, of dead submits
                try:
                    stored = self.objects.job_ids()
                except ObjectStoreError as e:
                    log.warning("orphaned objects not checked: %s", e)
                    stored = {}
                for job_id, mtime in stored.items():
                    if job_id not in known and mtime < horizon and delete_job_files(self.storage, self.objects, job_id):
                        log.info("removed orphaned objects of job %s", job_id)
        self.passes += 1

"""The sweeper: retention deletes finished jobs' files, a stale job is re-queued and re-sent,
a job the broker never got is sent, and a broker that lost its queue gets the jobs again."""

from __future__ import annotations

import time

from jobs.settings import Settings
from jobs.states import State
from jobs.storage import Storage
from jobs.store import Store, new_job_id
from service.sweeper import Sweeper


class FakeBroker:
    def __init__(self, depth: int = 0):
        self.sent: list[str] = []
        self._depth = depth

    def enqueue(self, job_id: str) -> None:
        self.sent.append(job_id)

    def depth(self) -> int:
        return self._depth


def setup(tmp_path, **kw):
    s = Settings(data_dir=tmp_path, retention_days=7, stale_after_s=0.2, max_attempts=3, **kw)
    store, storage = Store(s.store_url), Storage(tmp_path)
    return s, store, storage


def job(store, storage) -> str:
    jid = new_job_id()
    storage.inputs_dir(jid).mkdir(parents=True)
    (storage.inputs_dir(jid) / "model.pt").write_bytes(b"x")
    store.create(id=jid, owner="t", arch="resnet18", num_classes=10, config={}, inputs={}, upload_bytes=1)
    return jid


def test_retention_deletes_files_of_old_finished_jobs_only(tmp_path):
    s, store, storage = setup(tmp_path)
    old, recent, queued = job(store, storage), job(store, storage), job(store, storage)
    for jid in (old, recent):
        store.mark_enqueued(jid)
        store.claim(jid, "w", stale_after_s=60, max_attempts=3)
        store.finish(jid, 1, State.SUCCEEDED, artifacts=["report.json"])
    with store.session.begin() as ses:  # pretend `old` finished 8 days ago
        from jobs.store import JobRow

        ses.query(JobRow).filter(JobRow.id == old).update({"finished_at": time.time() - 8 * 86400})
    store.mark_enqueued(queued)
    Sweeper(s, store, storage, FakeBroker(depth=1)).sweep()
    assert not storage.job_dir(old).exists() and store.get(old).files_deleted and store.get(old).artifacts == []
    assert storage.job_dir(recent).exists() and not store.get(recent).files_deleted
    assert storage.job_dir(queued).exists()


def test_stale_running_job_is_requeued_and_sent(tmp_path):
    s, store, storage = setup(tmp_path)
    jid = job(store, storage)
    store.mark_enqueued(jid)
    store.claim(jid, "w", stale_after_s=60, max_attempts=3)
    time.sleep(0.3)
    broker = FakeBroker(depth=1)
    Sweeper(s, store, storage, broker).sweep()
    assert broker.sent == [jid] and store.get(jid).state == "queued" and store.get(jid).enqueued_at


def test_unsent_job_is_sent_and_a_lost_queue_is_refilled(tmp_path):
    s, store, storage = setup(tmp_path, sweep_interval_s=1)
    never_sent = job(store, storage)
    time.sleep(2.1)
    broker = FakeBroker(depth=5)
    Sweeper(s, store, storage, broker).sweep()
    assert broker.sent == [never_sent]
    # the broker lost everything (e.g. a Redis without persistence restarted): empty queue
    with store.session.begin() as ses:
        from jobs.store import JobRow

        ses.query(JobRow).update({"updated_at": time.time() - 60})
    broker = FakeBroker(depth=0)
    Sweeper(s, store, storage, broker).sweep()
    assert broker.sent == [never_sent]

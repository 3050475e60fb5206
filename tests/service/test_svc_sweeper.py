"""The sweeper: retention deletes finished jobs' files, a stale job is re-queued and re-sent,
a job the broker never got is sent, messages the broker lost are restored whether or not others
still wait, and a job past the maximum run time fails. Rows age on a fake clock, not by sleeping."""

from __future__ import annotations

from svc_helpers import FakeClock

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
    store, storage = Store(s.store_url, clock=FakeClock()), Storage(tmp_path)
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
    for jid in (old,):
        store.mark_enqueued(jid)
        store.claim(jid, "w", stale_after_s=60, max_attempts=3)
        store.finish(jid, 1, State.SUCCEEDED, artifacts=["report.json"])
    store.clock.advance(8 * 86400)  # `old` finished 8 days ago ...
    store.claim(recent, "w", stale_after_s=60, max_attempts=3)  # ... `recent` just now
    store.finish(recent, 1, State.SUCCEEDED, artifacts=["report.json"])
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
    store.clock.advance(0.3)
    broker = FakeBroker(depth=1)
    Sweeper(s, store, storage, broker).sweep()
    assert broker.sent == [jid] and store.get(jid).state == "queued" and store.get(jid).enqueued_at


def test_unsent_job_is_sent_and_a_lost_queue_is_refilled(tmp_path):
    s, store, storage = setup(tmp_path, sweep_interval_s=1)
    never_sent = job(store, storage)
    store.clock.advance(2.1)
    broker = FakeBroker(depth=5)
    Sweeper(s, store, storage, broker).sweep()
    assert broker.sent == [never_sent]
    # the broker lost everything (e.g. a Redis without persistence restarted): empty queue
    store.clock.advance(60)
    broker = FakeBroker(depth=0)
    Sweeper(s, store, storage, broker).sweep()
    assert broker.sent == [never_sent]


def test_lost_messages_are_restored_while_others_still_wait(tmp_path):
    """Steady load: 5 queued jobs, 3 messages waiting. The two lost ones are sent again now,
    not once the queue has drained."""
    s, store, storage = setup(tmp_path, sweep_interval_s=1)
    ids = [job(store, storage) for _ in range(5)]
    for jid in ids:
        store.mark_enqueued(jid)
    broker = FakeBroker(depth=3)
    Sweeper(s, store, storage, broker).sweep()
    assert broker.sent == []  # within the grace period: messages may still be on their way
    store.clock.advance(11)
    Sweeper(s, store, storage, broker).sweep()
    assert len(broker.sent) == 2
    Sweeper(s, store, storage, FakeBroker(depth=5)).sweep()  # all accounted for: nothing more


def test_a_job_past_the_maximum_run_time_fails_and_its_worker_loses_it(tmp_path):
    s, store, storage = setup(tmp_path, max_job_runtime_s=3600)
    jid = job(store, storage)
    store.mark_enqueued(jid)
    store.claim(jid, "w", stale_after_s=1e9, max_attempts=3)
    store.clock.advance(1800)
    assert store.heartbeat(jid, 1)
    Sweeper(s, store, storage, FakeBroker(depth=0)).sweep()
    assert store.get(jid).state == "running"
    store.clock.advance(1801)
    assert store.heartbeat(jid, 1)
    Sweeper(s, store, storage, FakeBroker(depth=0)).sweep()
    j = store.get(jid)
    assert j.state == "failed" and "CLCALIB_MAX_JOB_RUNTIME_S" in j.error
    assert not store.heartbeat(jid, 1)  # the worker's next heartbeat finds the job gone and it stops

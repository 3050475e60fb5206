"""The job store's lifecycle rules, on SQLite and on PostgreSQL."""

from __future__ import annotations

import pytest
from svc_helpers import FakeClock

from jobs.states import State
from jobs.store import Store, new_job_id


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path):
    url = f"sqlite:///{tmp_path / 'jobs.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    s = Store(url, clock=FakeClock())
    yield s
    if request.param == "postgres":
        from jobs.store import Base

        Base.metadata.drop_all(s.engine)
    s.close()


def make(store: Store, owner: str = "t") -> str:
    jid = new_job_id()
    store.create(id=jid, owner=owner, arch="resnet18", num_classes=10, config={}, inputs={}, upload_bytes=1)
    return jid


def test_forward_only_lifecycle(store):
    jid = make(store)
    assert store.get(jid).state == State.QUEUED
    job = store.claim(jid, "w1", stale_after_s=60, max_attempts=3)
    assert job.state == State.RUNNING and job.attempts == 1
    assert store.claim(jid, "w2", stale_after_s=60, max_attempts=3) is None  # a duplicate delivery
    assert store.heartbeat(jid, 1, {"stage": "reconstruct", "unit": 1})
    assert store.finish(jid, 1, State.SUCCEEDED, metrics={"quant_top1": 0.9}, artifacts=["report.json"])
    # late writes from the same or an older attempt change nothing
    assert not store.heartbeat(jid, 1, {"stage": "reconstruct", "unit": 0})
    assert not store.finish(jid, 1, State.FAILED, error="late")
    assert not store.cancel(jid)
    j = store.get(jid)
    assert (j.state, j.metrics, j.error) == (State.SUCCEEDED, {"quant_top1": 0.9}, None)


def test_cancel_queued_and_running(store):
    a, b = make(store), make(store)
    assert store.cancel(a)
    assert store.claim(a, "w", stale_after_s=60, max_attempts=3) is None  # never starts
    store.claim(b, "w", stale_after_s=60, max_attempts=3)
    assert store.cancel(b)
    assert not store.heartbeat(b, 1)  # the worker learns it lost the job
    assert not store.finish(b, 1, State.SUCCEEDED)
    assert store.get(b).state == State.CANCELED


def test_stale_heartbeat_requeues_then_fails_after_max_attempts(store):
    jid = make(store)
    for attempt in (1, 2):
        assert store.claim(jid, f"w{attempt}", stale_after_s=0.2, max_attempts=2).attempts == attempt
        store.clock.advance(0.3)
        requeued, failed = store.reap_stale(stale_after_s=0.2, max_attempts=2)
        if attempt == 1:
            assert requeued == [jid] and store.get(jid).state == State.QUEUED
            assert not store.heartbeat(jid, 1)  # the lost worker, if it comes back, stops
    assert failed == [jid]
    j = store.get(jid)
    assert j.state == State.FAILED and "lost 2 times" in j.error
    assert [h["event"] for h in j.history] == ["claimed", "requeued", "claimed"]


def test_a_handed_back_attempt_requeues_at_once_and_is_not_a_lost_worker(store):
    """Workers stopped mid-job three times (deploys) and then lost once: with max_attempts=2 the
    job is still claimed after the hand-backs, and fails only when the lost workers reach it."""
    jid = make(store)
    for attempt in (1, 2, 3):
        assert store.claim(jid, f"w{attempt}", stale_after_s=60, max_attempts=2).attempts == attempt
        if attempt > 1:
            assert not store.hand_back(jid, attempt - 1, "SIGTERM")  # an older attempt owns nothing
        assert store.hand_back(jid, attempt, "SIGTERM")
        j = store.get(jid)
        assert (j.state, j.worker, j.enqueued_at) == (State.QUEUED, None, None)  # the sweeper sends it if no one did
        assert not store.heartbeat(jid, attempt)  # the stopped attempt owns nothing now
        assert not store.hand_back(jid, attempt, "SIGTERM")  # nor twice
    for attempt in (4, 5):  # now two lost workers
        assert store.claim(jid, f"w{attempt}", stale_after_s=60, max_attempts=2).attempts == attempt
        store.clock.advance(61)
        requeued, failed = store.reap_stale(stale_after_s=60, max_attempts=2)
        assert (requeued, failed) == (([jid], []) if attempt == 4 else ([], [jid]))
    j = store.get(jid)
    assert j.state == State.FAILED and "lost 2 times" in j.error, j.error
    assert [h["event"] for h in j.history].count("handed_back") == 3


def test_a_canceled_job_is_not_handed_back(store):
    jid = make(store)
    store.claim(jid, "w", stale_after_s=60, max_attempts=3)
    assert store.cancel(jid)
    assert not store.hand_back(jid, 1, "SIGTERM")
    assert store.get(jid).state == State.CANCELED


def test_list_is_per_owner_newest_first_with_cursor(store):
    mine = [make(store, "a") for _ in range(5)]
    make(store, "b")
    page1 = store.list("a", limit=2)
    page2 = store.list("a", limit=2, before_seq=page1[-1].seq)
    page3 = store.list("a", limit=2, before_seq=page2[-1].seq)
    assert [j.id for j in page1 + page2 + page3] == mine[::-1]
    assert store.counts_by_state()[State.QUEUED] == 6


def test_claim_next_alternates_tenants_whatever_the_message_says(store):
    """Tenant a queues 5 jobs, then tenant b one; one worker takes turns. b's job runs after at
    most one of a's, even though every message names one of a's jobs."""
    a_jobs = [make(store, "a") for _ in range(5)]
    store.clock.advance(1)
    order = []
    first = store.claim_next("w", stale_after_s=60, max_attempts=3, hint=a_jobs[0])
    order.append(first.owner)
    b_job = make(store, "b")
    store.finish(first.id, 1, State.SUCCEEDED)
    for hint in a_jobs[1:] + [b_job]:
        store.clock.advance(1)
        j = store.claim_next("w", stale_after_s=60, max_attempts=3, hint=hint)
        order.append(j.owner)
        store.finish(j.id, 1, State.SUCCEEDED)
    assert order == ["a", "b", "a", "a", "a", "a"]
    assert store.claim_next("w", stale_after_s=60, max_attempts=3, hint=b_job) is None  # nothing left


def test_claim_next_prefers_the_tenant_with_fewer_running_jobs(store):
    a1, a2, b1 = make(store, "a"), make(store, "a"), make(store, "b")
    assert store.claim_next("w1", stale_after_s=60, max_attempts=3).id == a1
    assert store.claim_next("w2", stale_after_s=60, max_attempts=3).id == b1  # a has one running
    assert store.claim_next("w3", stale_after_s=60, max_attempts=3).id == a2


def test_claim_next_takes_over_its_stale_hint_when_nothing_is_queued(store):
    jid = make(store)
    store.claim(jid, "w1", stale_after_s=60, max_attempts=3)
    assert store.claim_next("w2", stale_after_s=60, max_attempts=3, hint=jid) is None  # alive
    store.clock.advance(61)
    j = store.claim_next("w2", stale_after_s=60, max_attempts=3, hint=jid)
    assert j.id == jid and j.attempts == 2 and j.worker == "w2"


def test_the_time_estimate_scales_by_what_finished_jobs_took(store):
    """Issue 30: a job's estimate is the upload check's measured work times the median ratio of
    time taken to work over recent finished jobs; the submit's record keeps the model's file name."""
    assert store.speed_factor("t") == (None, 0)

    def done(owner: str, work: float, took: float) -> str:
        jid = new_job_id()
        store.create(id=jid, owner=owner, arch="program", num_classes=10, config={}, inputs={}, upload_bytes=1,
                     submitted={"model_file": "vit.pt2", "work_s": work})
        store.claim(jid, "w", stale_after_s=60, max_attempts=3)
        assert store.finish(jid, 1, State.SUCCEEDED, metrics={"total_seconds": took}, artifacts=[])
        return jid

    for work, took in ((10.0, 30.0), (20.0, 40.0), (5.0, 50.0)):  # ratios 3, 2, 10: median 3
        jid = done("t", work, took)
    make(store)  # a job without a record does not count, and has no model file
    assert store.speed_factor("t") == (3.0, 3)
    assert store.get(jid).model_file == "vit.pt2" and store.get(jid).submitted["work_s"] == 5.0
    # another tenant's run of tiny jobs (ratio 1000 each) moves neither t's factor nor its own
    for _ in range(12):
        done("u", 0.001, 1.0)
    assert store.speed_factor("t") == (3.0, 3) and store.speed_factor("u") == (None, 0)

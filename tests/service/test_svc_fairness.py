"""Fair share across tenants (issue 14 class 5), on Redis with a real worker: tenant A submits
50 jobs, then tenant B one. B's job starts after at most one more of A's (the one running when
B submitted may finish first), and B never sees a 5xx while it waits. The figure in
docs/service.md ("Fair share") is this test's output (run with -s)."""

from __future__ import annotations

import json
import threading
import time

from svc_fmnist import FAST, MOBILENET
from svc_helpers import Stack, wait_until

N_A = 50


def _submit(st, key, calib):
    with st.client(key, timeout=120) as c:
        r = c.post("/v1/jobs", files={"model": ("m.safetensors", MOBILENET.read_bytes()),
                                      "calibration": (calib.name, calib.read_bytes())},
                   data={"arch": "mobilenet_v2", "num_classes": "10", "config": json.dumps(FAST)})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def test_one_tenants_backlog_does_not_delay_another(tmp_path, redis_server, fmnist_zips):
    redis = redis_server()
    redis.start()
    st = Stack(tmp_path / "stack", CLCALIB_REDIS_URL=redis.url, CLCALIB_MAX_ACTIVE_JOBS=N_A + 10)
    try:
        st.start_api()
        st.start_worker()
        t0 = time.monotonic()
        a_ids = [_submit(st, "key-a", fmnist_zips["calib"]) for _ in range(N_A)]
        submit_s = time.monotonic() - t0
        b_id = _submit(st, "key-b", fmnist_zips["calib"])
        statuses: list[int] = []
        stop = threading.Event()

        def poll():  # B watches its job the whole time
            with st.client("key-b", timeout=30) as c:
                while not stop.is_set():
                    statuses.append(c.get(f"/v1/jobs/{b_id}").status_code)
                    time.sleep(0.2)

        poller = threading.Thread(target=poll)
        poller.start()
        try:
            b = st.wait_state(b_id, states=("running", "succeeded"), timeout=120, key="key-b")
        finally:
            stop.set()
            poller.join(30)
        with st.client("key-a") as c:
            a_jobs = [c.get(f"/v1/jobs/{i}").json() for i in a_ids]
        b_created, b_started = _ts(st.job(b_id, "key-b")["created_at"]), _ts(b["started_at"])
        started_between = [j for j in a_jobs if j["started_at"] and b_created < _ts(j["started_at"]) < b_started]
        done_before_b = sum(1 for j in a_jobs if j["started_at"] and _ts(j["started_at"]) < b_created)
        queued_at_b = N_A - done_before_b
        print(f"\nfairness: A submitted {N_A} jobs in {submit_s:.0f}s; when B submitted, {done_before_b} of A's had "
              f"started and {queued_at_b} were waiting; B's job started {b_started - b_created:.1f}s after "
              f"submission, after {len(started_between)} more of A's; B's {len(statuses)} status reads: "
              f"{sorted(set(statuses))}")
        assert queued_at_b > 10  # A really had a backlog when B arrived
        assert len(started_between) <= 1, started_between
        assert statuses and all(s == 200 for s in statuses), statuses
        with st.client("key-a") as c:  # the rest of A's backlog is not needed
            for i in a_ids:
                c.post(f"/v1/jobs/{i}/cancel")
        assert st.wait_state(b_id, timeout=120, key="key-b")["state"] == "succeeded"
        wait_until(lambda: all(st.job(i)["state"] in ("succeeded", "canceled") for i in a_ids), 120,
                   "A's jobs to end")
    finally:
        st.close()
        redis.stop()


def _ts(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()

"""Fair share across tenants (issue 14 class 5), on Redis with a real worker: tenant A submits
15 jobs, then tenant B one, then the worker starts (each upload check is its own sandboxed
process now, a few seconds each: a backlog built while the worker runs would need ~60 submits).
B's job starts after at most one of A's, and B never sees a 5xx while it waits. The figure in
docs/service.md ("Fair share") is this test's output (run with -s). And one tenant's open event
streams and slow uploads (issue 24 class 5) do not hold up another's requests."""

from __future__ import annotations

import json
import socket
import threading
import time

from svc_fmnist import FAST, MOBILENET
from svc_helpers import Stack, wait_until

N_A = 15
JOB = {**FAST, "method": "minmax", "calib_size": 16}  # what runs does not matter here, only in which order


def _submit(st, key, calib):
    with st.client(key, timeout=120) as c:
        r = c.post("/v1/jobs", files={"model": ("m.safetensors", MOBILENET.read_bytes()),
                                      "calibration": (calib.name, calib.read_bytes())},
                   data={"arch": "mobilenet_v2", "num_classes": "10", "config": json.dumps(JOB)})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def test_one_tenants_backlog_does_not_delay_another(tmp_path, redis_server, fmnist_zips):
    redis = redis_server()
    redis.start()
    st = Stack(tmp_path / "stack", CLCALIB_REDIS_URL=redis.url, CLCALIB_MAX_ACTIVE_JOBS=N_A + 10)
    try:
        st.start_api()
        t0 = time.monotonic()
        a_ids = [_submit(st, "key-a", fmnist_zips["calib"]) for _ in range(N_A)]
        submit_s = time.monotonic() - t0
        b_id = _submit(st, "key-b", fmnist_zips["calib"])
        st.start_worker()
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
        assert queued_at_b == N_A  # A really had a backlog when B arrived
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


STREAM_CAP, UPLOAD_CAP = 3, 2


def _slow_upload(port: int, key: str) -> socket.socket:
    """A submit whose body starts with 1000 bytes and then trickles (the caller sends more)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(f"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
              "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 10000000\r\n\r\n".encode()
              + b"--b\r\nContent-Disposition: form-data; name=\"model\"; filename=\"m.pt\"\r\n\r\n" + b"\0" * 1000)
    return s


def _reply(s: socket.socket) -> bytes:
    out = b""
    try:
        while chunk := s.recv(4096):
            out += chunk
            if b"\r\n\r\n" in out and b"}" in out.split(b"\r\n\r\n", 1)[1]:
                break
    except OSError:
        pass
    return out


def test_a_tenants_streams_and_slow_uploads_do_not_starve_another(tmp_path, fmnist_zips):
    """Tenant A holds as many event streams as it may (CLCALIB_MAX_STREAMS_PER_TENANT=3) and
    asks for more, and holds slow uploads (CLCALIB_MAX_UPLOADS_PER_TENANT=2) trickling 2 bytes/s
    and starts more: A's extra streams and uploads are 429 naming the setting, its slow bodies
    408 body_too_slow (CLCALIB_MIN_BODY_RATE_BYTES_S=2000 over 2 s after 2 s); tenant B's
    submits (202), reads (200) and its own stream are served quickly the whole time."""
    st = Stack(tmp_path / "stack", CLCALIB_MAX_STREAMS_PER_TENANT=STREAM_CAP, CLCALIB_MAX_UPLOADS_PER_TENANT=UPLOAD_CAP,
               CLCALIB_MIN_BODY_RATE_BYTES_S=2000, CLCALIB_BODY_RATE_WINDOW_S=2, CLCALIB_BODY_RATE_GRACE_S=2)
    streams: list = []
    try:
        st.start_api()
        a_job = _submit(st, "key-a", fmnist_zips["calib"])  # no worker: it stays queued, its stream open
        b_job = _submit(st, "key-b", fmnist_zips["calib"])
        a = st.client("key-a", timeout=10)
        for _ in range(STREAM_CAP):
            cm = a.stream("GET", f"/v1/jobs/{a_job}/events")
            r = cm.__enter__()
            assert r.status_code == 200
            lines = r.iter_lines()
            next(lines)  # the first event: the stream is open on the server
            streams.append((cm, lines))  # (a line iterator dropped closes its stream)
        r = a.get(f"/v1/jobs/{a_job}/events")
        assert r.status_code == 429 and r.json()["code"] == "too_many_streams", r.text
        assert "CLCALIB_MAX_STREAMS_PER_TENANT" in r.json()["detail"] and r.headers["Retry-After"]

        # A's slow uploads: UPLOAD_CAP are received (and trickle), the rest refused at once
        t0 = time.monotonic()
        slow = [_slow_upload(st.port, "key-a") for _ in range(UPLOAD_CAP)]
        time.sleep(0.3)
        extra = [_slow_upload(st.port, "key-a") for _ in range(3)]
        for s in extra:
            reply = _reply(s)
            assert reply.startswith(b"HTTP/1.1 429") and b"too_many_uploads" in reply, reply[:300]
            assert b"CLCALIB_MAX_UPLOADS_PER_TENANT" in reply
            s.close()
        stop = threading.Event()

        def trickle():
            while not stop.is_set():
                for s in slow:
                    try:
                        s.send(b"\0")
                    except OSError:
                        pass
                time.sleep(0.5)

        trickler = threading.Thread(target=trickle)
        trickler.start()

        # meanwhile B: reads, a stream of its own, and a submit
        b_reads: list[float] = []
        with st.client("key-b", timeout=30) as b:
            with b.stream("GET", f"/v1/jobs/{b_job}/events") as r:
                assert r.status_code == 200
            while time.monotonic() - t0 < 1.5:
                t = time.monotonic()
                assert b.get(f"/v1/jobs/{b_job}").status_code == 200
                assert b.get("/v1/jobs").status_code == 200
                b_reads.append(time.monotonic() - t)
            t = time.monotonic()
            _submit(st, "key-b", fmnist_zips["calib"])
            b_submit = time.monotonic() - t

        slow_replies = [_reply(s) for s in slow]
        slow_s = time.monotonic() - t0
        stop.set()
        trickler.join(10)
        for reply in slow_replies:
            assert reply.startswith(b"HTTP/1.1 408") and b"body_too_slow" in reply, reply[:300]
            assert b"CLCALIB_MIN_BODY_RATE_BYTES_S" in reply
        assert slow_s < 10, slow_s  # grace 2 s + window 2 s, measured each second
        with st.client("key-b", timeout=30) as b:
            for _ in range(10):
                t = time.monotonic()
                assert b.get(f"/v1/jobs/{b_job}").status_code == 200
                b_reads.append(time.monotonic() - t)
        print(f"\nstarvation: B's {len(b_reads)} reads took at most {max(b_reads) * 1000:.0f} ms, its submit "
              f"{b_submit:.1f}s, while A held {STREAM_CAP} streams and {UPLOAD_CAP} slow uploads (closed 408 "
              f"after {slow_s:.1f}s)")
        assert max(b_reads) < 1.0, b_reads
        assert b_submit < 20, b_submit

        # the slots come back: a closed stream and the ended uploads free theirs
        streams.pop()[0].__exit__(None, None, None)

        def stream_opens() -> bool:
            with a.stream("GET", f"/v1/jobs/{a_job}/events") as r:
                return r.status_code == 200

        wait_until(stream_opens, 10, "A's stream slot to come back", period=0.2)
        _submit(st, "key-a", fmnist_zips["calib"])  # 202: its upload slots are free again
        with st.client("key-a") as c:
            m = c.get("/metrics").text
        assert 'clcalib_tenant_limit_refusals_total{limit="max_streams_per_tenant"} 1.0' in m, m
        assert 'clcalib_tenant_limit_refusals_total{limit="max_uploads_per_tenant"} 3.0' in m, m
    finally:
        for cm, _ in streams:
            cm.__exit__(None, None, None)
        st.close()

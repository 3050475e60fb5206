"""Jobs over Redis with the default SQLite store, one real worker: end to end with the real
library, load while a job runs, cancel (queued and running), delete, events, pagination,
and tenant isolation on every route."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, RedisServer, Stack, wait_until
from svc_fmnist import TINY

LONG = {**TINY, "iters": 200000, "calib_size": 256}  # runs until canceled


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    d = tmp_path_factory.mktemp("jobs")
    redis = RedisServer(d / "redis", appendonly=True)
    redis.start()
    st = Stack(d / "stack", CLCALIB_REDIS_URL=redis.url)
    try:
        st.start_api()
        st.start_worker()
        yield st
    finally:
        st.close()
        redis.stop()


def evaluate_checkpoint(path: Path, eval_zip: Path) -> dict:
    """Reload the downloaded checkpoint with the library and measure top-1 on the eval set."""
    from svc_eval import evaluate

    return evaluate(path, eval_zip)


def test_end_to_end_on_redis(stack, fmnist, reference_model, tmp_path):
    r = stack.submit(reference_model, fmnist["calib"], TINY, evaluation=fmnist["eval"])
    assert r.status_code == 202, r.text
    jid = r.json()["id"]
    job = stack.wait_state(jid, timeout=300)
    assert job["state"] == "succeeded", (job, stack.logs())
    assert {"quantized.safetensors", "report.json", "report.html"} <= set(job["artifacts"])
    with stack.client() as c:
        listed = c.get(f"/v1/jobs/{jid}/artifacts").json()["artifacts"]
        assert {a["name"] for a in listed} == set(job["artifacts"])
        ckpt = tmp_path / "q.safetensors"
        with c.stream("GET", f"/v1/jobs/{jid}/artifacts/quantized.safetensors") as resp:
            assert resp.status_code == 200
            with open(ckpt, "wb") as f:
                for chunk in resp.iter_bytes():
                    f.write(chunk)
        report = c.get(f"/v1/jobs/{jid}/artifacts/report.json").json()
    assert report["metrics"] == job["metrics"]
    got = evaluate_checkpoint(ckpt, fmnist["eval"])
    assert got["quant_top1"] == report["metrics"]["quant_top1"], (got, report["metrics"])


def test_events_stream_until_the_end(stack, fmnist, reference_model):
    jid = stack.submit(reference_model, fmnist["calib"], TINY).json()["id"]
    events = []
    with stack.client() as c, c.stream("GET", f"/v1/jobs/{jid}/events", timeout=300) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        ev = None
        for line in r.iter_lines():
            if line.startswith("event:"):
                ev = line[6:].strip()
            elif line.startswith("data:"):
                events.append((ev, json.loads(line[5:])))
                if ev == "end":
                    break
    states = [d["state"] for e, d in events if e == "status"]
    assert states[-1] == "succeeded" and events[-1] == ("end", {"state": "succeeded"})
    assert any((d.get("progress") or {}).get("num_units") for e, d in events if e == "status")


def test_load_cancel_running_and_queued(stack, fmnist, reference_model):
    a = stack.submit(reference_model, fmnist["calib"], LONG).json()["id"]
    wait_until(lambda: (stack.job(a).get("progress") or {}).get("stage") == "reconstruct", 120,
               "the long job to start reconstructing")
    b = stack.submit(reference_model, fmnist["calib"], TINY).json()["id"]  # queued behind a

    # bounded loopback load while a job runs: 200 concurrent pollers
    out = subprocess.run([sys.executable, "-m", "service.loadtest", "--url", stack.url, "--key", "key-a",
                          "--job", a, "--concurrency", "200", "--requests", "3000"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    load = json.loads(out.stdout.strip().splitlines()[-1])
    print("\nload figures:", json.dumps(load))
    if os.environ.get("CLCALIB_LOAD_REPORT"):
        Path(os.environ["CLCALIB_LOAD_REPORT"]).write_text(json.dumps(load, indent=2))
    assert load["errors"] == {} and load["requests"] == 3000
    assert load["p99_ms"] < 5000

    assert stack.job(b)["state"] == "queued"
    with stack.client() as c:
        assert c.post(f"/v1/jobs/{b}/cancel").json()["state"] == "canceled"
        running = c.post(f"/v1/jobs/{a}/cancel").json()
        assert running["state"] == "canceled"
        assert c.post(f"/v1/jobs/{a}/cancel").status_code == 409
    # the worker stops the canceled job and takes the next one
    nxt = stack.submit(reference_model, fmnist["calib"], TINY).json()["id"]
    assert stack.wait_state(nxt, timeout=300)["state"] == "succeeded", stack.logs()
    jb = stack.job(b)
    assert jb["state"] == "canceled" and jb["attempts"] == 0 and jb["started_at"] is None
    ja = stack.job(a)
    assert ja["state"] == "canceled" and ja["artifacts"] == []
    assert all(w.alive() for w in stack.workers)


def test_tenant_isolation_on_every_route(stack, fmnist, reference_model):
    jid = stack.submit(reference_model, fmnist["calib"], TINY).json()["id"]
    stack.wait_state(jid, timeout=300)
    routes = [("GET", f"/v1/jobs/{jid}"), ("GET", f"/v1/jobs/{jid}/events"),
              ("GET", f"/v1/jobs/{jid}/artifacts"), ("GET", f"/v1/jobs/{jid}/artifacts/report.json"),
              ("GET", f"/v1/jobs/{jid}/artifacts/quantized.safetensors"),
              ("POST", f"/v1/jobs/{jid}/cancel"), ("DELETE", f"/v1/jobs/{jid}")]
    with stack.client("key-b") as other, stack.client(None) as anon:
        for method, path in routes:
            r = other.request(method, path)
            assert r.status_code == 404, (method, path, r.status_code, r.text)
            assert r.json()["code"] == "not_found"
            assert anon.request(method, path).status_code == 401, (method, path)
        assert jid not in [j["id"] for j in other.get("/v1/jobs").json()["jobs"]]
    with stack.client("key-a") as mine:  # still there, untouched
        assert mine.get(f"/v1/jobs/{jid}").json()["state"] == "succeeded"
        assert mine.get(f"/v1/jobs/{jid}/artifacts/report.json").status_code == 200


def test_list_pagination_and_delete(stack, fmnist, reference_model):
    with stack.client("key-a") as c:
        all_ids, cursor = [], None
        while True:
            page = c.get("/v1/jobs", params={"limit": 2, **({"cursor": cursor} if cursor else {})}).json()
            all_ids += [j["id"] for j in page["jobs"]]
            cursor = page["next_cursor"]
            if not cursor:
                break
        assert len(all_ids) == len(set(all_ids)) >= 5
        created = [c.get(f"/v1/jobs/{i}").json()["created_at"] for i in all_ids]
        assert created == sorted(created, reverse=True)

        jid = next(i for i in all_ids if c.get(f"/v1/jobs/{i}").json()["state"] == "succeeded")
        files = Path(stack.env["CLCALIB_DATA_DIR"]) / "jobs" / jid
        assert files.is_dir()
        assert c.delete(f"/v1/jobs/{jid}").status_code == 204
        assert not files.exists()
        assert c.get(f"/v1/jobs/{jid}").status_code == 404
        assert c.get(f"/v1/jobs/{jid}/artifacts/report.json").status_code == 404
        assert c.delete(f"/v1/jobs/{jid}").status_code == 404


def test_metrics_and_readyz(stack):
    with stack.client() as c:
        m = c.get("/metrics").text
        assert 'clcalib_jobs{state="succeeded"}' in m and "clcalib_queue_depth" in m
        assert "clcalib_job_duration_seconds_bucket" in m and "clcalib_upload_bytes_total" in m
        ready = c.get("/readyz").json()
        assert ready["checks"] == {"store": "ok", "broker": "ok", "storage": "ok"}

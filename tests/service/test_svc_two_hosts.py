"""Workers on other hosts (issue 26): the API, Redis, PostgreSQL and an S3 API (moto's server) on
loopback, and two worker processes that share no folder with the API. Each worker runs under
Landlock with the API's data folder (and the rest of the API's temporary tree) out of reach
(``confined.py`` checks that before it starts the worker), with its own data and scratch folder:
every byte a worker reads or writes goes through the object store.

One run: two jobs end to end; the worker running the longer one is SIGKILLed after two units and
the other resumes it from the state uploaded to the store; the downloads' SHA-256 match the
reports' (``clcalib download`` checks them, and refuses a file changed in the store); a delete
empties the job's prefix; then the faults: the store down at submit (503 naming it), a worker that
cannot reach the store (the job fails in one line after ``CLCALIB_OBJECT_RETRY_S``), a missing
bucket (503 naming it)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from svc_fmnist import FAST, MOBILENET
from svc_helpers import ROOT, wait_until

from jobs.store import Store

CONFINE = [sys.executable, str(Path(__file__).with_name("confined.py"))]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_two_workers_without_the_api_disk(redis_server, own_postgres_url, stack_factory, s3_server, fmnist_zips,
                                         tmp_path):
    s3 = s3_server()
    redis = redis_server()
    st = stack_factory(CLCALIB_REDIS_URL=redis.url, CLCALIB_DATABASE_URL=own_postgres_url, CLCALIB_STALE_AFTER_S=4,
                       CLCALIB_VALIDATE_SAMPLE=8, CLCALIB_OBJECT_RETRY_S=4, **s3.env)
    api_data = Path(st.env["CLCALIB_DATA_DIR"])
    st.start_api()
    workers, scratch = [], []
    for i in range(2):
        own = tmp_path / f"host{i}"  # beside the stack's folder, not in it: the API's tree is hidden
        for sub in ("data", "scratch", "tmp"):
            (own / sub).mkdir(parents=True)
        scratch.append(own / "scratch")
        workers.append(st.start_worker(wait=False, prefix=[*CONFINE, "--hide", str(st.dir), "--allow", str(own), "--"],
                                       env={"CLCALIB_DATA_DIR": str(own / "data"), "CLCALIB_SCRATCH_DIR": str(own / "scratch"),
                                            "TMPDIR": str(own / "tmp")}))
    for w in workers:
        wait_until(lambda w=w: "worker ready" in w.log.read_text(errors="replace") or not w.alive(), 120, "a worker")
        assert w.alive() and f"confined: {st.dir} is not readable" in w.log.read_text(), w.tail()

    long = {**FAST, "iters": 20, "batch_size": 8}  # long enough to be killed between units
    ids = []
    for cfg in (long, FAST):
        r = st.submit(MOBILENET, fmnist_zips["calib"], cfg, arch="mobilenet_v2")
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
    victim = ids[0]
    assert not (api_data / "jobs" / victim).exists()  # the staged uploads went to the store
    assert s3.keys(f"jobs/{victim}/") == [f"jobs/{victim}/inputs/calibration.zip",
                                          f"jobs/{victim}/inputs/model.safetensors"]

    def two_units_stored():
        j = st.job(victim)
        assert j["state"] in ("queued", "running"), (j, st.logs())
        done = (j.get("progress") or {}).get("unit", 0) >= 2
        return j if done and s3.keys(f"jobs/{victim}/resume/") else None

    seen = wait_until(two_units_stored, 180, "the long job's state after two units in the store", period=0.2)
    store = Store(own_postgres_url, create=False)
    holder = store.get(victim).worker  # clcalib-cpu-<pid>@<host>
    store.close()
    killed = next(w for w in workers if f"-{w.pid}@" in holder)
    killed.kill()  # SIGKILL, the whole process group
    killed.p.wait(10)
    survivor = next(w for w in workers if w is not killed)

    final = {jid: st.wait_state(jid, timeout=300) for jid in ids}
    assert [j["state"] for j in final.values()] == ["succeeded", "succeeded"], st.logs()
    v = final[victim]
    # resumed from the state in the store: at most the unit that was being uploaded is done again
    assert v["attempts"] == 2 and v["metrics"]["resumed_units"] >= seen["progress"]["unit"] - 1 >= 1, \
        (seen["progress"], v["metrics"]["resumed_units"])
    time.sleep(1.0)
    assert [p.name for p in scratch[workers.index(survivor)].iterdir()] == [], "the survivor kept scratch files"
    assert not any(p.name in ("out", "resume") for p in api_data.rglob("*")), "artifacts reached the API's disk"

    # every artifact's SHA-256: recorded in the job, listed, in the report, checked by clcalib download
    for jid in ids:
        j = final[jid]
        assert s3.keys(f"jobs/{jid}/resume/") == []
        assert sorted(j["artifact_sha256"]) == sorted(j["artifacts"]) == ["quantized.safetensors", "report.html",
                                                                          "report.json"]
        out = tmp_path / "dl" / jid
        cli = subprocess.run([sys.executable, "-m", "clcalib.cli", "download", jid, "-o", str(out)], cwd=ROOT,
                             env={**os.environ, "CLCALIB_URL": st.url, "CLCALIB_API_KEY": "key-a"},
                             capture_output=True, text=True, timeout=120)
        assert cli.returncode == 0, cli.stderr
        report = json.loads((out / "report.json").read_text())
        for name, digest in j["artifact_sha256"].items():
            assert sha256(out / name) == digest
        assert report["sha256"]["quantized.safetensors"] == j["artifact_sha256"]["quantized.safetensors"]
        with st.client() as c:
            r = c.get(f"/v1/jobs/{jid}/artifacts/quantized.safetensors")
            assert r.headers["x-checksum-sha256"] == j["artifact_sha256"]["quantized.safetensors"]
            assert {a["name"]: a["sha256"] for a in c.get(f"/v1/jobs/{jid}/artifacts").json()["artifacts"]} == \
                j["artifact_sha256"]

    # a file changed in the store: clcalib download refuses it and writes nothing
    s3.admin().put_object(Bucket=s3.bucket, Key=f"jobs/{ids[1]}/out/report.json", Body=b'{"tampered": true}')
    bad = subprocess.run([sys.executable, "-m", "clcalib.cli", "download", ids[1], "--name", "report.json", "-o",
                          str(tmp_path / "bad.json")], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "CLCALIB_URL": st.url, "CLCALIB_API_KEY": "key-a"})
    assert bad.returncode == 1 and "SHA-256" in bad.stderr and not (tmp_path / "bad.json").exists(), bad.stderr
    with st.client() as c:  # delete: the job's prefix is emptied
        assert c.delete(f"/v1/jobs/{ids[1]}").status_code == 204
    assert s3.keys(f"jobs/{ids[1]}/") == []

    # a worker that cannot reach the store: the job fails in one line after CLCALIB_OBJECT_RETRY_S
    os.killpg(survivor.pid, signal.SIGSTOP)
    try:
        r = st.submit(MOBILENET, fmnist_zips["calib"], FAST, arch="mobilenet_v2")
        assert r.status_code == 202, r.text
        stranded = r.json()["id"]
        s3.kill()
        # and the store down at submit: 503 naming it, before the upload is read
        r = st.submit(MOBILENET, fmnist_zips["calib"], FAST, arch="mobilenet_v2")
        assert r.status_code == 503 and r.json()["code"] == "object_store_unavailable", r.text
        assert "cannot be reached" in r.json()["detail"] and r.headers["retry-after"], r.text
    finally:
        os.killpg(survivor.pid, signal.SIGCONT)
    j = st.wait_state(stranded, timeout=120)
    assert j["state"] == "failed" and "\n" not in j["error"], j
    assert "fetching the job's" in j["error"] and "cannot be reached" in j["error"] and "tried for 4s" in j["error"], j

    # a store without the bucket (a fresh server on the same port): 503 naming the bucket, /readyz too
    s3.start(bucket=False)
    r = st.submit(MOBILENET, fmnist_zips["calib"], FAST, arch="mobilenet_v2")
    assert r.status_code == 503 and f"bucket '{s3.bucket}' does not exist" in r.json()["detail"], r.text
    ready = st.client().get("/readyz")
    assert ready.status_code == 503 and "does not exist" in ready.json()["checks"]["objects"], ready.text

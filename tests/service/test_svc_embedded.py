"""The one-command default: ``clcalib serve`` with no Redis, no PostgreSQL and no API keys
(SQLite store and file-backed queue in the data dir, a local worker started by serve), driven
by the CLI subcommands. Jobs survive a crash and restart of the whole thing."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import httpx
from svc_eval import evaluate
from svc_fmnist import FAST, MOBILENET, TINY_RUN
from svc_helpers import ROOT, Proc, free_port, wait_until

from clcalib.testing import process_state
from jobs.store import Store
from service.client import Client


def _env(tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLCALIB_")}
    env.update({
        "CLCALIB_DATA_DIR": str(tmp_path / "data"), "CLCALIB_DEVICE": "cpu", "CLCALIB_TORCH_THREADS": "1",
        "OMP_NUM_THREADS": "1", "CLCALIB_HEARTBEAT_S": "0.5", "CLCALIB_STALE_AFTER_S": "5",
        "CLCALIB_SWEEP_INTERVAL_S": "1", "CUDA_VISIBLE_DEVICES": "",
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
    })
    return env


def _serve(env, port, log) -> Proc:
    p = Proc([sys.executable, "-m", "clcalib.cli", "serve", "--host", "0.0.0.0", "--port", str(port)], env, log)
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: httpx.get(url + "/readyz", timeout=2).status_code == 200, 90, f"clcalib serve\n{p.tail()}")
    wait_until(lambda: "worker ready" in log.read_text(errors="replace"), 90, f"the local worker\n{p.tail()}")
    return p


def cli(env, *args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clcalib.cli", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_serve_embedded_end_to_end_and_restart(tmp_path, fmnist_zips, reference_model):
    env = _env(tmp_path)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    serve = _serve(env, port, log)
    try:
        text = log.read_text()
        assert "refusing to listen on 0.0.0.0" in text and "127.0.0.1 only" in text
        assert (tmp_path / "data" / "jobs.db").is_file() and (tmp_path / "data" / "queue").is_dir()

        # submit / watch / status / download through the CLI
        common = ["--url", url]
        r = cli(env, "submit", *common, "--model", str(reference_model), "--arch", "resnet18", "--num-classes", "10",
                "--calibration", str(fmnist_zips["calib"]), "--evaluation", str(fmnist_zips["eval"]), "--config", json.dumps(TINY_RUN))
        assert r.returncode == 0, r.stderr
        jid = r.stdout.strip()
        w = cli(env, "watch", *common, jid)
        assert w.returncode == 0, (w.stdout, w.stderr, serve.tail())
        st = json.loads(cli(env, "status", *common, jid, "--json").stdout)
        assert st["state"] == "succeeded"
        # watch ends with one summary line: the job's own numbers, rounded
        m = st["metrics"]
        assert w.stdout.startswith(f"job {jid}: succeeded; top-1 {m['quant_top1']:.2f} % (FP {m['fp_top1']:.2f} %)"), \
            w.stdout
        assert cli(env, "status", *common, jid).stdout.startswith(f"job {jid}: succeeded\ntop-1 ")
        out = tmp_path / "out"
        d = cli(env, "download", *common, jid, "-o", str(out))
        assert d.returncode == 0, d.stderr
        assert {p.name for p in out.iterdir()} >= {"quantized.safetensors", "report.json", "report.html"}
        report = json.loads((out / "report.json").read_text())
        got = evaluate(out / "quantized.safetensors", fmnist_zips["eval"])
        assert got["quant_top1"] == report["metrics"]["quant_top1"], (got, report["metrics"])

        # crash everything (SIGKILL to serve, its worker and validator) with jobs queued and running
        with Client(url) as c:
            ids = [c.submit(model=MOBILENET, calibration=fmnist_zips["calib"], arch="mobilenet_v2", num_classes=10,
                            config={**FAST, "iters": 15} if i == 0 else {**FAST, "method": "minmax", "calib_size": 16})["id"]
                   for i in range(3)]
            before = [c.status(i)["state"] for i in ids]
        serve.kill(signal.SIGKILL)
        serve.p.wait(10)
        assert "queued" in before, before  # at least one job waits in the file queue
    finally:
        serve.stop()

    serve = _serve(env, port, tmp_path / "serve2.log")
    try:
        final = [wait_until(lambda i=i: (lambda j: j if j["state"] in ("succeeded", "failed") else None)(
            httpx.get(f"{url}/v1/jobs/{i}").json()), 300, f"job {i} after the restart\n{serve.tail()}") for i in ids]
        assert [j["state"] for j in final] == ["succeeded"] * 3, final
        jobs = httpx.get(f"{url}/v1/jobs").json()["jobs"]
        assert len(jobs) == 4 and {j["state"] for j in jobs} == {"succeeded"}
        # SIGTERM to serve alone (a process manager stopping it) while a job runs: its local worker
        # stops with it, handing the job back to the queue (it resumes at the next start at once,
        # not after the stale timeout), instead of calibrating on alone
        with Client(url) as c:
            long = c.submit(model=MOBILENET, calibration=fmnist_zips["calib"], arch="mobilenet_v2", num_classes=10,
                            config={**FAST, "iters": 20000})["id"]
            wait_until(lambda: c.status(long)["state"] == "running", 120, "the long job to start")
        worker = int(re.findall(r"local worker started \(pid (\d+)\)", (tmp_path / "serve2.log").read_text())[-1])
        os.kill(serve.pid, signal.SIGTERM)
        t0 = time.monotonic()
        serve.p.wait(60)
        assert time.monotonic() - t0 < 15, "serve took its time to stop"  # 5 s for the worker, uvicorn's 5 s
        wait_until(lambda: process_state(worker) in ("", "Z"), 30, f"the local worker (pid {worker}) to stop with serve")
        store = Store(f"sqlite:///{tmp_path / 'data' / 'jobs.db'}", create=False)
        row = store.get(long)
        store.close()
        assert row.state == "queued" and row.history[-1]["event"] == "handed_back", row.history
        # the stopping worker's last look at the file queue left the new message for the next start
        assert row.attempts == 1 and [h["event"] for h in row.history].count("claimed") == 1, row.history
    finally:
        serve.stop()


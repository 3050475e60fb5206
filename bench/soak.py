"""A bounded fault soak of the deployed shape, on loopback (issue 26): the API (uvicorn), Redis
(AOF, fsync always), PostgreSQL, an S3 API (moto's server, behind a TCP gate that can refuse
connections) and 3 workers, each with its own data and scratch folder (no disk shared with the
API). 30 small jobs from 3 tenants; during the run:

1. a worker is SIGKILLed mid-unit (the long job, once it has finished 2 units) and a new one starts;
2. redis-server is SIGKILLed and restarted;
3. the object store refuses every connection for 20 s (the gate closes; moto keeps its objects,
   which live in its memory: a restart would empty it);
4. the API is stopped (SIGTERM) and started again.

Then every checkpoint is downloaded with ``Client.download`` (which checks the
``X-Checksum-Sha256`` header) and its SHA-256 compared with the report's and the job's. One JSON
row per event is appended to ``bench/results/soak.jsonl`` as it happens (``--out``), the summary
last; the markdown table goes to stdout:

    python -m bench.soak                # ~5-10 min on a 2-core VM; needs redis-server, PostgreSQL
                                        # ($CLCALIB_TEST_PG), moto + flask, Fashion-MNIST, the references

What each fault cost: from the fault's start to the first job that succeeded after the fault was
over (the store's 20 s and the API's restart included), beside the median gap between two
successes without a fault.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "service"))  # the service tests' process helpers

from svc_helpers import PG_ADMIN, RedisServer, S3Server, Stack, free_port, wait_until  # noqa: E402

from clcalib.testing import PREPROCESS, REFERENCE, write_zip  # noqa: E402

MOBILENET = REFERENCE / "fmnist_mobilenet_v2.safetensors"
FAST = {"method": "brecq", "w_bits": 4, "a_bits": 4, "iters": 2, "calib_size": 64, "batch_size": 32,
        "preprocess": PREPROCESS}
LONG = {**FAST, "iters": 30}  # the job whose worker is killed: slow enough units
TENANTS = {"key-a": "tenant-a", "key-b": "tenant-b", "key-c": "tenant-c"}


class Gate:
    """A TCP proxy in front of the S3 server. Closed, its port refuses connections and the ones
    open are cut: the store is down for everyone, while the server behind keeps its objects."""

    def __init__(self, target_port: int):
        self.target, self.port = target_port, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._srv: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    def open(self) -> None:
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", self.port))
        srv.listen(64)
        self._srv = srv
        threading.Thread(target=self._accept, args=(srv,), daemon=True).start()

    def close(self) -> None:
        srv, self._srv = self._srv, None
        if srv is not None:
            srv.close()
        with self._lock:
            for c in self._conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                c.close()
            self._conns.clear()

    def _accept(self, srv: socket.socket) -> None:
        while True:
            try:
                a, _ = srv.accept()
            except OSError:
                return
            try:
                b = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                a.close()
                continue
            with self._lock:
                self._conns += [a, b]
            for x, y in ((a, b), (b, a)):
                threading.Thread(target=self._pump, args=(x, y), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class Rows:
    def __init__(self, path: Path, t0: float):
        self.path, self.t0 = path, t0
        path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, **row) -> dict:
        row = {"at_s": round(time.monotonic() - self.t0, 1), **row}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), file=sys.stderr, flush=True)
        return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=30)
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--store-down-s", type=float, default=20.0)
    ap.add_argument("--timeout-s", type=float, default=1500.0, help="the whole run's bound")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "soak.jsonl")
    args = ap.parse_args()

    import psycopg

    from jobs.store import Store
    from service.client import Client

    work = Path(tempfile.mkdtemp(prefix="clcalib-soak-"))
    t0 = time.monotonic()
    row = Rows(args.out, t0)
    run = uuid.uuid4().hex[:8]
    row(event="start", run=run, jobs=args.jobs, workers=args.workers, tenants=len(TENANTS),
        store_down_s=args.store_down_s, cores=os.cpu_count())
    calib = write_zip(work / "calib.zip", "train", range(64), by_class=False)
    admin = psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5)
    db = f"clcalib_soak_{run}"
    admin.execute(f'CREATE DATABASE "{db}"')
    pg = f"{PG_ADMIN.rsplit('/', 1)[0]}/{db}"
    s3 = S3Server(work / "s3").start()
    gate = Gate(s3.port)
    gate.open()
    redis = RedisServer(work / "redis", appendonly=True)
    redis.start()
    st = Stack(work / "stack", CLCALIB_REDIS_URL=redis.url, CLCALIB_DATABASE_URL=pg, CLCALIB_STALE_AFTER_S=4,
               CLCALIB_VALIDATE_SAMPLE=8, CLCALIB_OBJECT_RETRY_S=60, CLCALIB_API_KEYS=json.dumps(TENANTS),
               **{**s3.env, "CLCALIB_S3_ENDPOINT_URL": gate.url})
    store = None
    try:
        st.start_api()
        store = Store(pg, create=False)

        def start_worker():
            own = work / f"host{len(st.workers)}"
            return st.start_worker(wait=False, env={"CLCALIB_DATA_DIR": str(own / "data"),
                                                    "CLCALIB_SCRATCH_DIR": str(own / "scratch")})

        for _ in range(args.workers):
            start_worker()
        for w in st.workers:
            wait_until(lambda w=w: "worker ready" in w.log.read_text(errors="replace") or not w.alive(), 180,
                       "a worker")
        row(event="ready")

        ids, owner, refused = [], {}, []
        keys = list(TENANTS)

        def submit(i: int) -> None:
            """As a client would: a 503 or a refused connection (a fault) is tried again after 2 s."""
            key = keys[i % len(keys)]
            give_up = time.monotonic() + 180
            while True:
                try:
                    r = st.submit(MOBILENET, calib, LONG if i == 0 else FAST, key=key, arch="mobilenet_v2")
                    if r.status_code == 202:
                        break
                    why = f"{r.status_code} {r.text[:200]}"
                except Exception as e:  # the API restarting
                    why = f"{type(e).__name__}: {str(e)[:200]}"
                refused.append(row(event="submit_refused", i=i, why=why))
                if time.monotonic() > give_up:
                    return
                time.sleep(2.0)
            owner[r.json()["id"]] = key
            ids.append(r.json()["id"])

        submit(0)  # the long one first, then the rest while the faults run (faults wait for what they need)
        victim = ids[0]
        submitter = threading.Thread(target=lambda: [submit(i) for i in range(1, args.jobs)], daemon=True)
        submitter.start()

        faults: list[dict] = []
        done: dict[str, dict] = {}
        succeeded_at: list[float] = []
        kill = {}

        def poll():
            for jid in list(ids):
                if jid in done:
                    continue
                j = store.get(jid)
                if j is not None and j.terminal:
                    done[jid] = {"state": j.state, "error": j.error, "attempts": j.attempts}
                    now = time.monotonic() - t0
                    if j.state == "succeeded":
                        succeeded_at.append(now)
                    row(event="job_done", job=jid, tenant=TENANTS[owner[jid]], state=j.state, attempts=j.attempts,
                        error=j.error)

        def fault(name: str, fn) -> None:
            start = time.monotonic() - t0
            info = fn() or {}
            end = time.monotonic() - t0
            faults.append({"fault": name, "start_s": start, "end_s": end, **info})
            row(event="fault", fault=name, start_s=round(start, 1), end_s=round(end, 1), **info)

        def kill_worker():
            j = store.get(victim)
            holder = next(w for w in st.workers if w.alive() and f"-{w.pid}@" in (j.worker or ""))
            holder.kill()
            holder.p.wait(10)
            p = store.get(victim).progress or {}
            start_worker()
            units = p.get("unit", 0) + (1 if p.get("stage") == "unit_done" else 0)
            kill.update(units_done=units)
            return {"job": victim, "units_done_at_kill": units, "stage": p.get("stage")}

        def restart_redis():
            depth = redis.llen("clcalib")
            redis.kill()
            time.sleep(1.0)
            redis.start()
            return {"messages_before": depth, "messages_after": redis.llen("clcalib")}

        def store_down():
            gate.close()
            time.sleep(args.store_down_s)
            gate.open()

        def restart_api():
            st.stop_api()
            st.start_api()

        plan = [("worker_sigkill", kill_worker), ("redis_restart", restart_redis),
                ("store_down", store_down), ("api_restart", restart_api)]
        end = t0 + args.timeout_s
        logged: set[str] = set()
        while time.monotonic() < end and (submitter.is_alive() or len(done) < len(ids)):
            if not submitter.is_alive() and "submitted" not in logged:
                logged.add("submitted")
                row(event="submitted", jobs=len(ids), refused=len(refused))
            poll()
            n_ok = len(succeeded_at)
            if plan and plan[0][0] == "worker_sigkill":
                j = store.get(victim)
                p = (j.progress or {}) if j else {}
                if j is not None and j.state == "running" and p.get("stage") == "reconstruct" and p.get("unit", 0) >= 2 \
                        and s3.keys(f"jobs/{victim}/resume/"):
                    fault(*plan.pop(0))
                elif j is None or j.terminal:  # it ended before it could be caught mid-unit
                    row(event="fault_skipped", fault=plan.pop(0)[0], why=f"job 0 is {j.state if j else 'gone'}")
            elif plan and n_ok >= {"redis_restart": 8, "store_down": 14, "api_restart": 20}[plan[0][0]]:
                fault(*plan.pop(0))
            time.sleep(0.5)
        poll()

        # every checkpoint downloaded (the client checks the header) and compared with its report
        matches, checked = 0, 0
        dl = work / "downloads"
        dl.mkdir()
        for jid, d in done.items():
            if d["state"] != "succeeded":
                continue
            with Client(st.url, owner[jid]) as c:
                job = c.status(jid)
                ck = c.download(jid, "quantized.safetensors", dl / f"{jid}.safetensors")
                report = json.loads(c.download(jid, "report.json", dl / f"{jid}.json").read_text())
            got = hashlib.sha256(ck.read_bytes()).hexdigest()
            checked += 1
            matches += got == report["sha256"]["quantized.safetensors"] == job["artifact_sha256"]["quantized.safetensors"]
        v = store.get(victim)
        resumed = (v.metrics or {}).get("resumed_units")
        gaps = [b - a for a, b in zip(succeeded_at, succeeded_at[1:], strict=False)]
        cost = {}
        for f in faults:
            after = [t for t in succeeded_at if t > f["end_s"]]
            cost[f["fault"]] = round(after[0] - f["start_s"], 1) if after else None
        states = [d["state"] for d in done.values()]
        summary = row(
            event="summary", jobs=len(ids), succeeded=states.count("succeeded"), failed=states.count("failed"),
            canceled=states.count("canceled"), lost=len(ids) - len(done), submits_refused=len(refused),
            artifacts_checked=checked,
            artifacts_hash_match=matches, fault_cost_s=cost,
            median_gap_between_successes_s=round(statistics.median(gaps), 1) if gaps else None,
            victim_attempts=v.attempts if v else None, victim_units_done_at_kill=kill.get("units_done"),
            victim_resumed_units=resumed,
            victim_units_recomputed=(kill["units_done"] - resumed) if resumed is not None and kill else None,
            faults_run=[f["fault"] for f in faults], wall_s=round(time.monotonic() - t0, 1),
            errors=sorted({d["error"] for d in done.values() if d["error"]})[:5])
        print(table(summary))
    finally:
        if store is not None:
            store.close()
        st.close()
        redis.stop()
        gate.close()
        s3.stop()
        admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        admin.close()


def table(s: dict) -> str:
    c = s["fault_cost_s"]
    return "\n".join([
        "| jobs | succeeded | failed | lost | checkpoints whose SHA-256 matches | worker SIGKILL | redis restart "
        "| store down 20 s | API restart | units recomputed after the kill | wall |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {s['jobs']} | {s['succeeded']} | {s['failed']} | {s['lost']} | {s['artifacts_hash_match']} of "
        f"{s['artifacts_checked']} | {c.get('worker_sigkill')} s | {c.get('redis_restart')} s | "
        f"{c.get('store_down')} s | {c.get('api_restart')} s | {s['victim_units_recomputed']} "
        f"({s['victim_units_done_at_kill']} done, resumed at {s['victim_resumed_units']}) | {s['wall_s']} s |",
    ])


if __name__ == "__main__":
    main()

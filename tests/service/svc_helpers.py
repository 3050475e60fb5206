"""Helpers of the service tests: subprocesses (uvicorn, Celery worker, redis-server) on free ports."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
KEYS = {"key-a": "tenant-a", "key-b": "tenant-b"}
PG_ADMIN = os.environ.get("CLCALIB_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(cond, timeout: float, what: str, period: float = 0.1):
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        try:
            v = cond()
            if v:
                return v
        except AssertionError:
            raise
        except Exception as e:  # not up yet
            last = e
        time.sleep(period)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last})")


class Proc:
    """A subprocess in its own process group, its output in a log file."""

    def __init__(self, args: list[str], env: dict, log: Path):
        self.log = log
        self.fh = open(log, "ab")  # noqa: SIM115
        self.p = subprocess.Popen(args, env=env, cwd=ROOT, stdout=self.fh, stderr=subprocess.STDOUT,
                                  start_new_session=True)

    @property
    def pid(self) -> int:
        return self.p.pid

    def alive(self) -> bool:
        return self.p.poll() is None

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.alive():
            try:
                os.killpg(self.p.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, timeout: float = 15, signalled: bool = False) -> None:
        """SIGTERM (unless ``signalled`` already), then SIGKILL after ``timeout``."""
        if not signalled:
            self.kill(signal.SIGTERM)
        try:
            self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill(signal.SIGKILL)
            self.p.wait(5)
        self.fh.close()

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


class RedisServer:
    def __init__(self, workdir: Path, appendonly: bool = True):
        if shutil.which("redis-server") is None:
            pytest.fail("redis-server is not on PATH: install it (apt-get install -y redis-server); "
                        "the service tests start their own instance")
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.appendonly = appendonly
        self.proc: Proc | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                "--save", "", "--appendonly", "yes" if self.appendonly else "no",
                "--appendfsync", "always", "--daemonize", "no"]
        self.proc = Proc(args, dict(os.environ), self.dir / "redis.log")
        import redis

        r = redis.Redis(port=self.port, socket_connect_timeout=1)
        wait_until(lambda: r.ping(), 20, f"redis-server on port {self.port}\n{self.proc.tail()}")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill(signal.SIGKILL)
            self.proc.p.wait(10)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def llen(self, key: str) -> int:
        import redis

        return redis.Redis(port=self.port).llen(key)


class Stack:
    """An API (uvicorn, real HTTP) and any number of workers, all subprocesses, sharing env."""

    def __init__(self, workdir: Path, **env):
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CLCALIB_")}
        self.env.update({
            "CLCALIB_DATA_DIR": str(self.dir / "data"),
            "CLCALIB_API_KEYS": '{"key-a": "tenant-a", "key-b": "tenant-b"}',
            "CLCALIB_HEARTBEAT_S": "0.5", "CLCALIB_STALE_AFTER_S": "5", "CLCALIB_SWEEP_INTERVAL_S": "1",
            "CLCALIB_DEVICE": "cpu", "CLCALIB_TORCH_THREADS": "1", "OMP_NUM_THREADS": "1",
            "CLCALIB_VALIDATE_TIMEOUT_S": "120",
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
            "CUDA_VISIBLE_DEVICES": "",
        })
        self.env.update({k: str(v) for k, v in env.items()})
        self.api: Proc | None = None
        self.workers: list[Proc] = []

    def start_api(self) -> Stack:
        args = [sys.executable, "-m", "uvicorn", "--factory", "service.app:create_app",
                "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning",
                "--timeout-keep-alive", "30"]
        self.api = Proc(args, self.env, self.dir / "api.log")
        wait_until(lambda: httpx.get(self.url + "/readyz", timeout=2).status_code == 200, 60,
                   f"the API at {self.url}\n{self.api.tail()}")
        # the validator child imports torch on first use; let it finish before timing anything
        wait_until(lambda: self.client("key-a").get("/v1/archs", timeout=60).status_code == 200, 90,
                   "the validator to start")
        return self

    def stop_api(self) -> None:
        if self.api is not None:
            self.api.stop()
            self.api = None

    def start_worker(self, wait: bool = True, prefix: list[str] | None = None, env: dict | None = None) -> Proc:
        """``prefix``: a command the worker runs under (e.g. a confinement); ``env``: overrides."""
        w = Proc([*(prefix or []), sys.executable, "-m", "worker"], {**self.env, **(env or {})},
                 self.dir / f"worker{len(self.workers)}.log")
        self.workers.append(w)
        if wait:
            wait_until(lambda: "worker ready" in w.log.read_text(errors="replace") or not w.alive(), 90,
                       "the worker to start")
            assert w.alive(), f"worker exited at start:\n{w.tail()}"
        return w

    def client(self, key: str | None = "key-a", **kw) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=kw.pop("timeout", 60), **kw)

    def submit(self, model: Path, calib: Path, config: dict, key: str = "key-a",
               evaluation: Path | None = None, arch: str = "resnet18", num_classes: int = 10,
               labels: Path | None = None) -> httpx.Response:
        import json

        files = {"model": (model.name, model.read_bytes()), "calibration": (calib.name, calib.read_bytes())}
        if evaluation is not None:
            files["evaluation"] = (evaluation.name, evaluation.read_bytes())
        if labels is not None:
            files["labels"] = (labels.name, labels.read_bytes())
        with self.client(key) as c:
            return c.post("/v1/jobs", files=files, data={"arch": arch, "num_classes": str(num_classes),
                                                           "config": json.dumps(config)})

    def job(self, job_id: str, key: str = "key-a") -> dict:
        with self.client(key) as c:
            r = c.get(f"/v1/jobs/{job_id}")
            assert r.status_code == 200, r.text
            return r.json()

    def wait_state(self, job_id: str, states=("succeeded", "failed", "canceled"), timeout: float = 120,
                   key: str = "key-a") -> dict:
        j = wait_until(lambda: (lambda j: j if j["state"] in states else None)(self.job(job_id, key)),
                       timeout, f"job {job_id} to reach {states}\n--- api\n{self.api.tail() if self.api else ''}"
                       + "".join(f"\n--- worker\n{w.tail()}" for w in self.workers), period=0.2)
        return j

    def logs(self) -> str:
        out = f"--- api\n{self.api.tail(60) if self.api else ''}"
        for i, w in enumerate(self.workers):
            out += f"\n--- worker{i}\n{w.tail(60)}"
        return out

    def close(self) -> None:
        # all told to stop at once: an idle worker on the file queue takes seconds to notice
        procs = [p for p in [*self.workers, self.api] if p is not None]
        for p in procs:
            p.kill(signal.SIGTERM)
        for p in procs:
            p.stop(signalled=True)
        self.api = None


class FakeClock:
    """Wall-clock seconds that move only when a test says (Store(clock=...)): rows age
    without sleeping."""

    def __init__(self):
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, s: float) -> None:
        self.now += s


def peak_rss(pid: int) -> int:
    """The process's peak resident memory (the kernel's VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


def children(pid: int) -> list[int]:
    """Pids of the process's direct children (the API's validator processes)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


class S3Server:
    """A real S3 API on a free loopback port: moto's server mode (``python -m moto.server``) with one
    bucket; ``auth``: IAM authentication enforced (requests must be signed with the access key made
    at start). moto 5.2.1 then refuses correctly signed listings whose query holds a '/' (a Prefix
    such as ``jobs/<id>/``: SignatureDoesNotMatch; MinIO and S3 take them), so only the credential
    tests enforce it. Objects live in its memory: a kill loses them (a restart is an empty store)."""

    def __init__(self, workdir: Path, bucket: str = "clcalib-test"):
        self.dir, self.bucket = workdir, bucket
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.key = self.secret = ""
        self.proc: Proc | None = None

    def start(self, auth: bool = False, bucket: bool = True) -> S3Server:
        import json

        import boto3

        env = dict(os.environ)
        if auth:  # the first 3 requests (the IAM calls below) unsigned, every later one checked
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "3"
        self.proc = Proc([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)], env,
                         self.dir / "moto.log")
        wait_until(lambda: httpx.get(self.url + "/moto-api/", timeout=2).status_code == 200, 30,
                   f"moto's S3 server on port {self.port}\n{self.proc.tail()}")
        if auth:
            iam = boto3.client("iam", endpoint_url=self.url, region_name="us-east-1",
                               aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
            iam.create_user(UserName="clcalib")
            iam.put_user_policy(UserName="clcalib", PolicyName="s3", PolicyDocument=json.dumps({
                "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
            k = iam.create_access_key(UserName="clcalib")["AccessKey"]
            self.key, self.secret = k["AccessKeyId"], k["SecretAccessKey"]
        elif not self.key:
            self.key, self.secret = "AKIATESTTESTTEST", "test-secret"
        if bucket:
            self.admin().create_bucket(Bucket=self.bucket)
        return self

    def admin(self, secret: str | None = None):
        import boto3

        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1", aws_access_key_id=self.key,
                            aws_secret_access_key=secret or self.secret)

    @property
    def env(self) -> dict[str, str]:
        return {"CLCALIB_S3_BUCKET": self.bucket, "CLCALIB_S3_ENDPOINT_URL": self.url,
                "AWS_ACCESS_KEY_ID": self.key, "AWS_SECRET_ACCESS_KEY": self.secret}

    def keys(self, prefix: str = "") -> list[str]:
        r = self.admin().list_objects_v2(Bucket=self.bucket, Prefix=prefix)
        return sorted(o["Key"] for o in r.get("Contents", []))

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill(signal.SIGKILL)
            self.proc.p.wait(10)
            self.proc.fh.close()
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

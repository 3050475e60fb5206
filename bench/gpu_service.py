"""A real service job on a CUDA worker (issue 29): ``clcalib serve``'s one-command local mode
(SQLite store, file-backed queue, a local Celery worker) with CLCALIB_DEVICE set to --device,
driven through the Python client, then the same calibration through the CLI.

One JSON row per result is appended to OUT/gpu_service.jsonl as soon as it is known (a cut run
keeps what finished); the server's log (API and worker) is OUT/server*.log. Stages:

  server  serve on a free loopback port, a temporary data dir, an API key (CLCALIB_API_KEYS),
          CLCALIB_DEVICE; ready once /readyz answers 200 and the worker logged "worker ready"
  a       the reference resnet18 (safetensors, arch resnet18, 10 classes) with the Fashion-MNIST
          calibration and evaluation zips, qdrop W4A4, --iters, export ["onnx"]: wall time from
          submit to succeeded, the report's device, top-1 and ONNX agreement, the sandbox line
  b       quantized.safetensors downloaded (SHA-256 checked by the client, and against the
          report), loaded and evaluated on the CPU in this process as `clcalib evaluate` does:
          is its top-1 the report's?
  c       the same (job, download, evaluation) for a .pt2 upload: torch.export of the reference
          mobilenet_v2 with a dynamic batch dimension
  d       the calibration of a with `python -m clcalib.cli calibrate` on the same device: its
          wall time and the ratio service/CLI

A stage starts only with time left before --deadline; a failure is a row with the error and
the run goes on. If a fails in the sandbox, it is run again on a restarted server, so a sandbox
failure on the GPU is told from any other (--no-unconfined-retry: not): with no memory cap
(CLCALIB_WORKER_MEMORY_BYTES=0) where the error names the cap (CUDA's host mappings under
RLIMIT_DATA were never measured), then with CLCALIB_SANDBOX=off; c runs under the settings that
passed (the defaults if none did). Rows say which sandbox and cap they ran under. The ONNX export is asked only where onnx and
onnxruntime import (the carry may leave them out: its MANIFEST.json says why, and so do the rows).

    python bench/gpu_service.py --device cpu --iters 20 --calib-size 256 --eval-images 1000 --out /tmp/svc
    bash bench/gpu_service.sh        # on the device, with .gpu_svc/ carried
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from importlib.metadata import entry_points
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PREPROCESS = {"resize": None, "crop": None, "mean": [0.286], "std": [0.353]}  # clcalib.testing's
CALIB, EVAL = "fmnist_train_1024.zip", "fmnist_test_10k.zip"  # bench/accuracy.py's prepare_data
MIN_STAGE_S = 20  # a stage with less time left than this is skipped
T0 = time.monotonic()


def elapsed() -> float:
    return round(time.monotonic() - T0, 1)


def sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Rows:
    def __init__(self, out: Path, device: str):
        self.path = out / "gpu_service.jsonl"
        self.device = device
        self.rows: list[dict] = []

    def emit(self, stage: str, **row) -> dict:
        row = {"stage": stage, "device_arg": self.device, "t": elapsed(), **row}
        self.rows.append(row)
        line = json.dumps(row, default=str)
        with open(self.path, "a") as f:
            f.write(line + "\n")
        print(line, flush=True)
        return row


class Server:
    """``clcalib serve`` (the embedded mode: API + local worker) in its own process group."""

    def __init__(self, a: argparse.Namespace, sandbox: str, n: int, env_extra: dict[str, str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.key = secrets.token_urlsafe(24)
        self.sandbox = sandbox
        self.data = Path(tempfile.mkdtemp(prefix="clcalib-svc-"))
        self.log = a.out / f"server{n}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CLCALIB_")}
        env.update({
            "CLCALIB_DATA_DIR": str(self.data), "CLCALIB_API_KEYS": json.dumps({self.key: "gpu-bench"}),
            "CLCALIB_DEVICE": a.device, "CLCALIB_TORCH_THREADS": str(a.threads), "OMP_NUM_THREADS": str(a.threads),
            "CLCALIB_SANDBOX": sandbox, "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
        })
        if a.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        env.update(env_extra)
        self.env_extra = env_extra
        # `clcalib serve` where the service's commands are registered (an installed clcalib);
        # on the device nothing is installed: the same function cmd_serve calls
        if any(ep.name == "service" for ep in entry_points(group="clcalib.commands")):
            self.launcher = "python -m clcalib.cli serve"
            cmd = [sys.executable, "-m", "clcalib.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        else:
            self.launcher = "service.serve.serve (clcalib's service commands are not installed here)"
            cmd = [sys.executable, "-c", "import sys; from service.serve import serve; "
                   "serve(host='127.0.0.1', port=int(sys.argv[1]))", str(self.port)]
        self.fh = open(self.log, "ab")  # noqa: SIM115
        self.p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.fh, stderr=subprocess.STDOUT,
                                  start_new_session=True)

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, n: int = 30) -> list[str]:
        return self.text().splitlines()[-n:]

    def wait_ready(self, timeout: float) -> float:
        import httpx

        t = time.monotonic()
        end = t + timeout
        while time.monotonic() < end:
            if self.p.poll() is not None:
                raise RuntimeError(f"serve exited with {self.p.returncode}")
            try:
                ok = httpx.get(self.url + "/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok and "worker ready" in self.text():
                return round(time.monotonic() - t, 1)
            time.sleep(0.5)
        raise TimeoutError(f"serve not ready after {timeout:.0f} s")

    def worker_line(self) -> str | None:
        m = re.findall(r"worker ready: .*", self.text())
        return m[-1] if m else None

    def job_lines(self, job_id: str) -> list[str]:
        """The worker's lines about this job's sandboxed child (how it was confined, its peak memory,
        how it ended)."""
        return [ln.split(": ", 1)[-1] if ln.count(": ") else ln for ln in self.text().splitlines()
                if job_id in ln and ("sandbox" in ln or "peak memory" in ln)][-5:]

    def _group_alive(self) -> bool:
        self.p.poll()  # reaps serve itself
        try:
            os.killpg(self.p.pid, 0)
            return True
        except ProcessLookupError:
            return False

    def stop(self) -> dict:
        """SIGTERM to serve's process group, then wait for all of it: serve itself may go first
        (uvicorn re-raises the signal once shut down, so serve does not wait for its local worker),
        and the worker must be gone, and the GPU free, before the next stage. SIGKILL after 30 s."""
        t = time.monotonic()
        killed = False
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            if not self._group_alive():
                break
            killed = sig == signal.SIGKILL
            try:
                os.killpg(self.p.pid, sig)
            except ProcessLookupError:
                break
            end = time.monotonic() + wait
            while self._group_alive() and time.monotonic() < end:
                time.sleep(0.2)
        self.fh.close()
        shutil.rmtree(self.data, ignore_errors=True)
        return {"stop_s": round(time.monotonic() - t, 1), "sigkill": killed, "group_left": self._group_alive()}

    def info(self) -> dict:
        line = self.worker_line() or ""
        abi = re.search(r"landlock ABI (\d+)", line)
        cap = re.search(r"memory cap ([\d.]+) GiB", line)
        return {"sandbox_setting": self.sandbox, **self.env_extra, "launcher": self.launcher, "worker_ready": line or None,
                "landlock_abi": int(abi.group(1)) if abi else None, "memory_cap_gib": float(cap.group(1)) if cap else None}


def eval_subset(src: Path, n: int, work: Path) -> Path:
    """The first ``n`` test images (by index) of the class-folder zip, as their own zip."""
    if not n:
        return src
    dest = work / f"fmnist_test_{n}.zip"
    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as zo:
        for name in zi.namelist():
            if name.endswith(".png") and int(Path(name).stem) < n:
                zo.writestr(name, zi.read(name))
    return dest


def evaluate_cpu(checkpoint: Path, eval_zip: Path, threads: int) -> dict:
    """`clcalib evaluate --device cpu` in this process: load_quantized, the checkpoint's own
    preprocessing, predict, top-1."""
    import torch

    from clcalib.config import Preprocess
    from clcalib.data import LabeledSet
    from clcalib.export import load_quantized
    from clcalib.metrics import predict, top1

    torch.set_num_threads(threads)
    t = time.monotonic()
    model = load_quantized(checkpoint, device="cpu")
    data = LabeledSet(eval_zip, Preprocess.model_validate(model.header["preprocess"]))
    logits = predict(model, data.images(), device="cpu")
    return {"cpu_top1": top1(logits, data.labels), "cpu_correct": int((logits.argmax(1) == data.labels).sum()),
            "images": len(data.labels), "eval_s": round(time.monotonic() - t, 1)}


METRICS = ("fp_top1", "quant_top1", "top1_agreement", "sqnr_db", "onnx_top1", "onnx_top1_agreement", "export_error",
           "eval_images", "calibration_seconds", "total_seconds", "peak_device_memory_bytes", "onnx_bytes")


def report_fields(report: dict) -> dict:
    m = report.get("metrics") or {}
    return {"report_device": report.get("device"), **{k: m.get(k) for k in METRICS},
            "warnings": (m.get("warnings") or [])[:5], "torch_threads": report.get("torch_threads"),
            "torch_version": (report.get("versions") or {}).get("torch")}


class Run:
    def __init__(self, a: argparse.Namespace):
        self.a = a
        self.rows = Rows(a.out, a.device)
        self.work = Path(tempfile.mkdtemp(prefix="gpu-service-"))
        self.server: Server | None = None
        self.n_servers = 0
        self.onnx_reason = None

    def left(self) -> float:
        return self.a.deadline - (time.monotonic() - T0)

    def skip(self, stage: str, why: str) -> None:
        self.rows.emit(stage, skipped=why)

    # ---- setup ---------------------------------------------------------------------------

    def environment(self) -> None:
        import torch

        manifest = {}
        if self.a.manifest and self.a.manifest.is_file():
            manifest = json.loads(self.a.manifest.read_text())
        onnx_ok = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))
        if not onnx_ok:
            self.onnx_reason = ("onnx/onnxruntime are not installed here: " +
                                ((manifest.get("left_out") or {}).get("onnx") or "not in this environment"))
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                    timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            commit = None
        versions = {}
        for mod in ("numpy", "PIL", "pydantic", "fastapi", "celery", "sqlalchemy", "onnx", "onnxruntime", "matplotlib"):
            try:
                versions[mod] = getattr(__import__(mod), "__version__", "?")
            except Exception as e:  # noqa: BLE001 - recorded, not fatal here
                versions[mod] = f"not importable: {type(e).__name__}: {e}"[:200]
        cuda = torch.cuda.is_available()
        self.rows.emit("environment", python=platform.python_version(), torch=torch.__version__,
                       cuda_available=cuda, gpu=torch.cuda.get_device_name() if cuda else None,
                       cpus=os.cpu_count(), commit=commit, versions=versions, onnx_export=onnx_ok,
                       onnx_reason=self.onnx_reason, iters=self.a.iters, calib_size=self.a.calib_size,
                       eval_images=self.a.eval_images or "all", threads=self.a.threads, deadline=self.a.deadline,
                       carry={k: manifest.get(k) for k in ("total_bytes", "left_out", "python_version")} or None)
        if self.a.device.startswith("cuda") and not cuda:
            self.rows.emit("environment", error="--device cuda but torch sees no CUDA device: the worker would fail")

    def data(self) -> bool:
        d = self.a.data_dir
        try:
            if not ((d / CALIB).is_file() and (d / EVAL).is_file()):
                from bench.accuracy import prepare_data  # needs the Fashion-MNIST package

                prepare_data(d)
            self.calib = d / CALIB
            self.eval = eval_subset(d / EVAL, self.a.eval_images, self.work)
        except Exception as e:  # noqa: BLE001
            self.rows.emit("data", error=f"{type(e).__name__}: {e}"[:1000])
            return False
        self.resnet18 = self.a.reference_dir / "fmnist_resnet18.safetensors"
        self.mobilenet = self.a.reference_dir / "fmnist_mobilenet_v2.safetensors"
        return True

    def config(self) -> dict:
        return {"method": "qdrop", "w_bits": 4, "a_bits": 4, "iters": self.a.iters, "calib_size": self.a.calib_size,
                "seed": 0, "preprocess": PREPROCESS, "export": [] if self.onnx_reason else ["onnx"]}

    def stop_server(self) -> None:
        if self.server is not None:
            self.rows.emit("server_stop", log=self.server.log.name, **self.server.stop())
            self.server = None

    def start_server(self, sandbox: str, **env_extra: str) -> bool:
        self.stop_server()
        self.n_servers += 1
        s = Server(self.a, sandbox, self.n_servers, env_extra)
        try:
            ready_s = s.wait_ready(min(180.0, max(self.left(), 10.0)))
        except Exception as e:  # noqa: BLE001
            self.rows.emit("server", error=f"{type(e).__name__}: {e}", **s.info(), log_tail=s.tail())
            s.stop()
            return False
        self.server = s
        self.rows.emit("server", ready_s=ready_s, url=s.url, log=s.log.name, **s.info())
        return True

    def client(self):
        from service.client import Client

        return Client(self.server.url, self.server.key, timeout=120)

    # ---- stages --------------------------------------------------------------------------

    def service_job(self, stage: str, model: Path, **kw) -> dict | None:
        """Submit, poll to the end, fetch report.json; the row. Returns the job's facts for the
        download stage (None when there is nothing to download)."""
        from service.client import ApiError

        if self.left() < MIN_STAGE_S:
            self.skip(stage, f"deadline: {self.left():.0f} s left")
            return None
        cfg = self.config()
        base = {"sandbox": self.server.sandbox, **self.server.env_extra, "model": model.name, "iters": cfg["iters"],
                "export": cfg["export"], **({"onnx_skipped": self.onnx_reason} if self.onnx_reason else {})}
        jid = None
        try:
            with self.client() as c:
                t = time.monotonic()
                job = c.submit(model=model, calibration=self.calib, evaluation=self.eval, config=cfg, **kw)
                jid, submit_s = job["id"], time.monotonic() - t
                while True:
                    j = c.status(jid)
                    if j["state"] in ("succeeded", "failed", "canceled"):
                        break
                    if self.left() < 5:
                        c.cancel(jid)
                        raise TimeoutError(f"job still {j['state']} at the deadline ({self.a.deadline:.0f} s); canceled")
                    time.sleep(0.25)
                wall = time.monotonic() - t
                row = {**base, "job_id": jid, "state": j["state"], "error": j.get("error"), "wall_s": round(wall, 2),
                       "submit_s": round(submit_s, 2), "attempts": j.get("attempts"),
                       "created_at": j.get("created_at"), "started_at": j.get("started_at"),
                       "finished_at": j.get("finished_at"), "artifacts": j.get("artifacts"),
                       "sandbox_log": self.server.job_lines(jid)}
                if j["state"] != "succeeded":
                    self.rows.emit(stage, **row, log_tail=self.server.tail())
                    return None
                digests = j.get("artifact_sha256") or {}
                rep = c.download(jid, "report.json", self.a.out / f"{stage}_report.json", sha256=digests.get("report.json"))
                report = json.loads(rep.read_text())
                row.update(report_fields(report))
                row["on_cuda"] = str(report.get("device", "")).startswith("cuda")
                self.rows.emit(stage, **row)
                return {"job_id": jid, "report": report, "digests": digests}
        except ApiError as e:
            self.rows.emit(stage, **base, job_id=jid, error=str(e)[:2000], http_status=e.status,
                           log_tail=self.server.tail())
        except Exception as e:  # noqa: BLE001
            self.rows.emit(stage, **base, job_id=jid, error=f"{type(e).__name__}: {e}"[:2000],
                           sandbox_log=self.server.job_lines(jid) if jid else None, log_tail=self.server.tail())
        return None

    def download_eval(self, stage: str, job: dict | None, of: str) -> None:
        if job is None:
            self.skip(stage, f"no succeeded job from stage {of}")
            return
        if self.left() < MIN_STAGE_S:
            self.skip(stage, f"deadline: {self.left():.0f} s left")
            return
        from service.client import DigestMismatch

        jid, report, digests = job["job_id"], job["report"], job["digests"]
        name = "quantized.safetensors"
        try:
            with self.client() as c:
                t = time.monotonic()
                dest = self.work / jid
                dest.mkdir(exist_ok=True)
                path = c.download(jid, name, dest, sha256=digests.get(name))
                got = sha256(path)
                row = {"job_id": jid, "download_s": round(time.monotonic() - t, 2), "bytes": path.stat().st_size,
                       "sha256_client_checked": True, "sha256_matches_report": got == (report.get("sha256") or {}).get(name)}
                if "model.onnx" in digests:  # also through the checked download
                    onnx = c.download(jid, "model.onnx", dest, sha256=digests["model.onnx"])
                    row["onnx_download_bytes"] = onnx.stat().st_size
            ev = evaluate_cpu(path, self.eval, self.a.threads)
            rep = report["metrics"].get("quant_top1")
            # the net difference in correctly classified images (not the images whose answer differs)
            diff = None if rep is None else ev["cpu_correct"] - round(rep * ev["images"] / 100)
            self.rows.emit(stage, **row, **ev, report_top1=rep, report_device=report.get("device"),
                           top1_equal=ev["cpu_top1"] == rep, correct_minus_report=diff)
        except DigestMismatch as e:
            self.rows.emit(stage, job_id=jid, error=f"DigestMismatch: {e}", sha256_client_checked=False)
        except Exception as e:  # noqa: BLE001
            self.rows.emit(stage, job_id=jid, error=f"{type(e).__name__}: {e}"[:2000],
                           traceback=traceback.format_exc()[-1500:])

    def program(self) -> Path:
        """The reference mobilenet_v2 as a torch.export program with a dynamic batch dimension
        (README.md's recipe)."""
        import torch

        from clcalib.graph.registry import build_model, read_state_dict

        model = build_model("mobilenet_v2", 10, read_state_dict(self.mobilenet)).eval()
        x = torch.randn(2, 3, 28, 28)
        path = self.work / "fmnist_mobilenet_v2.pt2"
        torch.export.save(torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},)), path)
        return path

    def cli(self, stage: str, service_row: dict | None) -> None:
        if self.left() < MIN_STAGE_S:
            self.skip(stage, f"deadline: {self.left():.0f} s left")
            return
        cfg = self.config()
        cfg_path = self.work / "cli_config.json"
        cfg_path.write_text(json.dumps(cfg))
        out = self.work / "cli_resnet18"
        cmd = [sys.executable, "-m", "clcalib.cli", "calibrate", "--arch", "resnet18", "--num-classes", "10",
               "--weights", str(self.resnet18), "--calib", str(self.calib), "--eval", str(self.eval),
               "--config", str(cfg_path), "--device", self.a.device, "--threads", str(self.a.threads),
               "--out", str(out), "--quiet"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("CLCALIB_")}
        env.update({"OMP_NUM_THREADS": str(self.a.threads), "PYTHONUNBUFFERED": "1",
                    "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)})
        if self.a.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        base = {"command": f"python -m clcalib.cli calibrate (same config, --device {self.a.device})",
                "iters": cfg["iters"], "export": cfg["export"]}
        t = time.monotonic()
        try:
            p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(self.left() - 3, 1))
        except subprocess.TimeoutExpired as e:  # its output comes as bytes whatever text= said
            err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
            self.rows.emit(stage, **base, error=f"timed out at the deadline after {time.monotonic() - t:.0f} s",
                           stderr_tail=err[-1500:])
            return
        wall = time.monotonic() - t
        (self.a.out / f"{stage}.log").write_text(p.stdout + p.stderr)
        row = {**base, "returncode": p.returncode, "wall_s": round(wall, 2)}
        if (out / "report.json").is_file():
            report = json.loads((out / "report.json").read_text())
            shutil.copy(out / "report.json", self.a.out / f"{stage}_report.json")
            row.update(report_fields(report))
            row["on_cuda"] = str(report.get("device", "")).startswith("cuda")
        if p.returncode != 0:
            row["error"] = (p.stderr or p.stdout)[-1500:]
        if service_row and service_row.get("wall_s") and p.returncode == 0:
            row["service_wall_s"] = service_row["wall_s"]
            row["service_over_cli"] = round(service_row["wall_s"] / wall, 3)
            if service_row.get("calibration_seconds") and row.get("calibration_seconds"):
                row["service_over_cli_calibration"] = round(service_row["calibration_seconds"] /
                                                            row["calibration_seconds"], 3)
            row["top1_equal_service"] = row.get("quant_top1") == service_row.get("quant_top1")
        self.rows.emit(stage, **row)

    # ---- the run ---------------------------------------------------------------------------

    def main(self) -> int:
        self.environment()
        if not self.data() or not self.start_server("on"):
            return self.summary()
        have_r18 = self.resnet18.is_file()
        why_r18 = f"{self.resnet18} is missing" + self._left_out("resnet18")
        job_a = None
        if have_r18:
            job_a = self.service_job("a_service_resnet18", self.resnet18, arch="resnet18", num_classes=10)
            if job_a is None and self.a.unconfined_retry:
                job_a = self.retry_a()
        else:
            self.skip("a_service_resnet18", why_r18)
        self.download_eval("b_download_eval_resnet18", job_a, "a")
        if self.mobilenet.is_file():
            try:
                pt2 = self.program()
            except Exception as e:  # noqa: BLE001
                self.rows.emit("c_service_pt2_mobilenet_v2", error=f"torch.export: {type(e).__name__}: {e}"[:2000])
                pt2 = None
            job_c = None
            if pt2 is not None and self.server is None:
                self.skip("c_service_pt2_mobilenet_v2", "no server: it did not restart after stage a")
            elif pt2 is not None:
                job_c = self.service_job("c_service_pt2_mobilenet_v2", pt2)
            self.download_eval("c_download_eval_pt2", job_c, "c")
        else:
            self.skip("c_service_pt2_mobilenet_v2", f"{self.mobilenet} is missing" + self._left_out("mobilenet_v2"))
        self.stop_server()
        if have_r18:
            service_a = next((r for r in reversed(self.rows.rows) if r["stage"].startswith("a_service")
                              and r.get("state") == "succeeded"), None)
            self.cli("d_cli_resnet18", service_a)
        else:
            self.skip("d_cli_resnet18", why_r18)
        return self.summary()

    def retry_a(self) -> dict | None:
        """Stage a again, to tell a sandbox failure on this machine from any other: without the
        memory cap where the error names it, then unconfined."""
        error = str(self.rows.rows[-1].get("error") or "")
        tries = [("a_service_resnet18_unconfined", "off", {})]
        if "CLCALIB_WORKER_MEMORY_BYTES" in error:
            tries.insert(0, ("a_service_resnet18_nocap", "on", {"CLCALIB_WORKER_MEMORY_BYTES": "0"}))
        for stage, sandbox, env in tries:
            if self.left() < 60:
                self.skip(stage, f"deadline: {self.left():.0f} s left for a retry")
                break
            if self.start_server(sandbox, **env):
                job = self.service_job(stage, self.resnet18, arch="resnet18", num_classes=10)
                if job is not None:
                    return job
        if self.left() > 60:  # not the sandbox's doing: c runs under the defaults
            self.start_server("on")
        return None

    def _left_out(self, group: str) -> str:
        if self.a.manifest and self.a.manifest.is_file():
            why = (json.loads(self.a.manifest.read_text()).get("left_out") or {}).get(group)
            if why:
                return f" ({why})"
        return ""

    def summary(self) -> int:
        self.stop_server()
        by = {r["stage"]: r for r in self.rows.rows}
        a = next((r for r in reversed(self.rows.rows) if r["stage"].startswith("a_service") and not r.get("skipped")),
                 {})
        checks = {
            "service_job_on_cuda": a.get("on_cuda"),
            "service_job_sandbox": a.get("sandbox"),
            "service_job_memory_cap": a.get("CLCALIB_WORKER_MEMORY_BYTES", "default"),
            "resnet18_top1_equal": by.get("b_download_eval_resnet18", {}).get("top1_equal"),
            "pt2_job_on_cuda": by.get("c_service_pt2_mobilenet_v2", {}).get("on_cuda"),
            "pt2_top1_equal": by.get("c_download_eval_pt2", {}).get("top1_equal"),
            "cli_on_cuda": by.get("d_cli_resnet18", {}).get("on_cuda"),
            "service_over_cli": by.get("d_cli_resnet18", {}).get("service_over_cli"),
        }
        errors = [r["stage"] for r in self.rows.rows if r.get("error")]
        skipped = [r["stage"] for r in self.rows.rows if r.get("skipped")]
        self.rows.emit("summary", checks=checks, errors=errors, skipped=skipped, onnx_skipped=self.onnx_reason)
        shutil.rmtree(self.work, ignore_errors=True)
        return 1 if errors else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--out", type=Path, required=True, help="folder for gpu_service.jsonl, the server's log, reports")
    p.add_argument("--data-dir", type=Path, default=ROOT / "bench" / "work",
                   help=f"where {CALIB} and {EVAL} are (made with bench.accuracy.prepare_data if missing)")
    p.add_argument("--reference-dir", type=Path, default=None, help="where fmnist_<arch>.safetensors are")
    p.add_argument("--iters", type=int, default=2000, help="iterations per reconstruction unit")
    p.add_argument("--calib-size", type=int, default=1024, help="calibration images used (of the 1024 in the zip)")
    p.add_argument("--eval-images", type=int, default=0, help="the first N test images only (default: all 10000)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the worker, the CLI and this process")
    p.add_argument("--deadline", type=float, default=540, help="seconds from start after which no stage runs")
    p.add_argument("--manifest", type=Path, default=None, help="the carry's MANIFEST.json (why something is missing)")
    p.add_argument("--no-unconfined-retry", dest="unconfined_retry", action="store_false",
                   help="do not retry a failed stage a without the memory cap or the sandbox")
    a = p.parse_args()
    if a.reference_dir is None:
        from clcalib.testing import REFERENCE

        a.reference_dir = REFERENCE
    a.out.mkdir(parents=True, exist_ok=True)
    return Run(a).main()


if __name__ == "__main__":
    sys.exit(main())

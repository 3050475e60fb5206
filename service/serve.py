"""``clcalib serve``: the API, plus a local worker process when no broker is configured
(the embedded one-command default: SQLite store and file-backed queue in the data dir)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time

from jobs.settings import Settings, get_settings
from service.connections import protocol
from service.security import is_loopback

log = logging.getLogger("clcalib.service")


def _set_pdeathsig() -> None:  # the local worker dies with serve, even on SIGKILL
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except Exception:
        pass


# A stopped serve waits this long for its local worker, then kills it. A worker running a job
# hands it back within about a second (worker.runner); an idle one on the file queue takes ~5 s
# to leave Celery's polling loop, holding no message, so killing it then loses nothing
LOCAL_WORKER_GRACE_S = 5.0


class LocalWorker:
    """A ``python -m worker`` child, restarted if it exits while serve runs."""

    def __init__(self, env: dict[str, str]):
        self.env = env
        self.proc: subprocess.Popen | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._supervise, name="local-worker", daemon=True)

    def start(self) -> None:
        self._spawn()
        self._thread.start()

    def _spawn(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "worker"], env=self.env,
                                     preexec_fn=_set_pdeathsig if os.name == "posix" else None)
        log.info("local worker started (pid %d)", self.proc.pid)

    def _supervise(self) -> None:
        while not self._stop.wait(1.0):
            if self.proc is not None and self.proc.poll() is not None:
                log.warning("local worker exited with %s; restarting", self.proc.returncode)
                time.sleep(1.0)
                if not self._stop.is_set():
                    self._spawn()

    def stop(self) -> None:
        self._stop.set()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=LOCAL_WORKER_GRACE_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def serve(*, host: str | None = None, port: int | None = None, worker: bool | None = None,
          settings: Settings | None = None) -> None:
    import uvicorn

    from service.app import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    s = settings or get_settings()
    host = host or s.host
    port = s.port if port is None else port
    if not s.api_keys and not is_loopback(host):
        log.warning("no API keys configured (CLCALIB_API_KEYS): refusing to listen on %s; "
                    "listening on 127.0.0.1 only", host)
        host = "127.0.0.1"
    if not s.api_keys:
        log.warning("no API keys configured: single-tenant mode on loopback (%s:%d)", host, port)
    local = None
    if worker if worker is not None else s.embedded_broker:
        env = dict(os.environ)
        env.setdefault("CLCALIB_DATA_DIR", str(s.data_dir))
        local = LocalWorker(env)
        local.start()
    if threading.current_thread() is threading.main_thread():
        # uvicorn shuts down on SIGTERM, then raises the signal again with the handler it found:
        # the default one ended this process before the finally below stopped the local worker,
        # which then finished its job alone (and a restarted serve ran a second worker beside it)
        signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        uvicorn.run(create_app(s), host=host, port=port, log_level="info", timeout_graceful_shutdown=5,
                    timeout_keep_alive=30, http=protocol(s.header_timeout_s, s.max_connections))
    finally:
        if local is not None:
            local.stop()


def _exit_on_signal(signum, frame) -> None:
    raise SystemExit(128 + signum)

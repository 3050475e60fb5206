"""A fork server for the sandboxed children: one process (the zygote) imports the heavy modules
(torch) once, then forks a child per run. A child then starts in milliseconds instead of spending
~4 s of CPU importing torch again, which was most of an upload check's cost and of the suite's.

Why a forked child is as safe as a fresh interpreter:
- the zygote never reads an uploaded byte and runs no code of a user: it imports our modules and
  forks; it starts with the same scrubbed environment a fresh child gets;
- a child closes the zygote's control socket and every other inherited descriptor before it does
  anything else, so it can never ask the zygote for a sibling that is not confined;
- the child then confines itself exactly as a fresh child does (``jobs.sandbox.main``).

A child belongs to the process that asked for it, not to the zygote: the zygote forks twice and
the middle process exits at once, so the child is re-parented to the caller, which registered
as a child subreaper (``PR_SET_CHILD_SUBREAPER``). The caller waits for it, kills it and reads its
exit status as it would a ``subprocess`` child, and the child dies with the caller
(``PR_SET_PDEATHSIG``, set once the re-parenting is done).
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable

MAX_STDERR = 1 << 20  # a process's stderr relayed to the log; the rest is dropped
_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_CHILD_SUBREAPER, _PR_SET_NAME = 36, 15
# pids this process waits for itself: its zygotes and the children it was handed
_mine: set[int] = set()
_mine_lock = threading.Lock()


class ZygoteFailed(RuntimeError):
    """The zygote could not fork a child (it did not start, or it died)."""


# ---- the caller's side -----------------------------------------------------------------------

class Forked:
    """A child forked by a zygote, re-parented to this process: the part of ``subprocess.Popen``
    the sandbox uses (pipes, poll, wait, kill)."""

    def __init__(self, pid: int, stdin: int, stdout: int, stderr: int):
        self.pid = pid
        self.stdin = os.fdopen(stdin, "wb")
        self.stdout = os.fdopen(stdout, "rb")
        self.stderr = os.fdopen(stderr, "rb")
        self.returncode: int | None = None
        self._lock = threading.Lock()

    def _reap(self, flags: int) -> int | None:
        try:
            pid, status = os.waitpid(self.pid, flags)
        except ChildProcessError:  # reaped elsewhere: its status is lost, it is gone
            pid, status = self.pid, signal.SIGKILL
        if not pid:
            return None
        with _mine_lock:
            _mine.discard(self.pid)
        return os.waitstatus_to_exitcode(status)

    def poll(self) -> int | None:
        if self.returncode is None and self._lock.acquire(blocking=False):
            try:
                if self.returncode is None:
                    self.returncode = self._reap(os.WNOHANG)
            finally:
                self._lock.release()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int | None:
        """Its exit status; None if it still runs after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        # polls, never a blocking waitpid under the lock: that held a kill() from another thread
        # (a run's close) until the process chose to exit
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                return None
            time.sleep(0.005)
        return self.returncode

    def kill(self) -> None:
        with self._lock:  # never a signal to a pid already reaped (and perhaps reused)
            if self.returncode is None:
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


class Zygote:
    """One zygote, started by this process with ``argv`` (which must end by calling ``serve`` on
    the socket whose descriptor number is appended to it)."""

    def __init__(self, argv: list[str], env: dict[str, str]):
        if _libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            raise ZygoteFailed(f"cannot become a child subreaper: {os.strerror(ctypes.get_errno())}")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # an empty folder of its own: ``python -m`` puts the working folder on sys.path, and the
        # sandbox grants reading every folder on sys.path (never "/" or a folder of ours)
        self.cwd = tempfile.mkdtemp(prefix="clcalib-zygote-")
        try:
            with _mine_lock:
                self.proc = _on_a_lasting_thread(lambda: subprocess.Popen(
                    [*argv, str(theirs.fileno())], pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=self.cwd, close_fds=True))
                _mine.add(self.proc.pid)
        finally:
            theirs.close()
        threading.Thread(target=relay, args=(self.proc.stderr, f"zygote {self.proc.pid}"), daemon=True).start()
        self.owner = os.getpid()
        self._ctrl = ours
        self._lock = threading.Lock()
        self._ready = False
        self._seq = 0

    def alive(self) -> bool:
        return self.owner == os.getpid() and self.proc.poll() is None

    def _recv(self, deadline: float) -> dict:
        self._ctrl.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            data = self._ctrl.recv(4096)
        except TimeoutError:
            raise ZygoteFailed("the zygote did not answer in time") from None
        except OSError as e:
            data = b""
            if not isinstance(e, ConnectionError):
                raise ZygoteFailed(f"the zygote's socket failed: {e}") from None
        if not data:
            raise ZygoteFailed(f"the zygote ended ({exit_text(self.proc.wait())}); see the log above this line")
        return json.loads(data)

    def spawn(self, target: str, cwd: str, timeout: float) -> Forked:
        """A new child running ``target`` in ``cwd``; waits for the zygote's imports first."""
        deadline = time.monotonic() + timeout
        reap_orphans()
        with self._lock:  # one request and its answer at a time
            if not self._ready:
                if self._recv(deadline).get("ready") is not True:
                    raise ZygoteFailed("the zygote did not start")
                self._ready = True
            pipes = [os.pipe() for _ in range(3)]  # stdin, stdout, stderr
            theirs = [pipes[0][0], pipes[1][1], pipes[2][1]]
            ours = [pipes[0][1], pipes[1][0], pipes[2][0]]
            self._seq += 1
            try:
                socket.send_fds(self._ctrl, [json.dumps({"target": target, "cwd": cwd, "seq": self._seq}).encode()],
                                theirs)
            except OSError as e:
                for fd in ours:
                    os.close(fd)
                raise ZygoteFailed(f"the zygote is gone ({e})") from None
            finally:
                for fd in theirs:
                    os.close(fd)
            try:
                reply = self._recv(deadline)
                while reply.get("seq") != self._seq:  # the late answer to a request that timed out
                    _discard(reply.get("pid"))
                    reply = self._recv(deadline)
            except ZygoteFailed:
                for fd in ours:
                    os.close(fd)
                raise
            if isinstance(reply.get("pid"), int):
                with _mine_lock:
                    _mine.add(reply["pid"])
        if not isinstance(reply.get("pid"), int):
            for fd in ours:
                os.close(fd)
            raise ZygoteFailed(f"the zygote could not fork: {reply.get('error')}")
        return Forked(reply["pid"], *ours)

    def close(self) -> None:
        import shutil

        self._ctrl.close()  # the zygote's loop ends at EOF
        if self.proc.poll() is None:
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with _mine_lock:
            _mine.discard(self.proc.pid)
        shutil.rmtree(self.cwd, ignore_errors=True)


def reap_orphans() -> None:
    """Waits for the zombies of a zygote's family that came to this process (a subreaper) when a
    process below it died with its own zygote and child (``clcalib serve``'s local worker): no
    one else ever would, and each would hold a pid for good."""
    with _mine_lock:
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/children") as f:
                    kids = [int(p) for p in f.read().split()]
            except (OSError, ValueError):
                continue
            for pid in kids:
                if pid not in _mine and _orphan(pid):
                    try:
                        os.waitpid(pid, os.WNOHANG)
                    except ChildProcessError:
                        pass


def _orphan(pid: int) -> bool:
    """A zombie named as a zygote, or as the child of a zygote that is not one of ours (see
    ``name_zygote``): ours are waited for by their ``Zygote``, ``Forked`` or ``_discard``."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    comm, rest = stat[stat.find(b"(") + 1:stat.rfind(b")")], stat[stat.rfind(b")") + 2:]
    if not rest.startswith(b"Z") or not comm.startswith(b"clcalib-"):
        return False
    owner = comm[len(b"clcalib-"):]
    return owner == b"zygote" or (owner.isdigit() and int(owner) not in _mine)


def name_zygote() -> None:
    """The zygote's process name (its forks' until they rename): how ``reap_orphans`` tells them."""
    _libc.prctl(_PR_SET_NAME, b"clcalib-zygote", 0, 0, 0)


_starter: tuple[int, concurrent.futures.ThreadPoolExecutor] | None = None
_starter_lock = threading.Lock()


def _on_a_lasting_thread(fn):
    """``fn()`` on the main thread or one that lives as long as this process: the zygote's
    PR_SET_PDEATHSIG fires when the *thread* that started it exits (a request's pool thread)."""
    global _starter
    if threading.current_thread() is threading.main_thread():
        return fn()
    with _starter_lock:
        if _starter is None or _starter[0] != os.getpid():  # a forked process has no such thread
            _starter = (os.getpid(), concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="zygote-starter"))
        pool = _starter[1]
    return pool.submit(fn).result()


def _discard(pid) -> None:
    """A child forked for a request that timed out: re-parented to us and no one's, it would run
    with the next request's pid mixed up (killed and waited for as another) and end a zombie."""
    if isinstance(pid, int) and pid > 0:
        try:
            os.kill(pid, signal.SIGKILL)  # ours and never waited for, so this pid is still its own
        except ProcessLookupError:
            return
        threading.Thread(target=_reap_quietly, args=(pid,), daemon=True).start()


def _reap_quietly(pid: int) -> None:
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


# ---- the zygote's side -----------------------------------------------------------------------

def serve(fd: int, run: Callable[[str], None]) -> None:
    """The zygote's loop, after its imports: fork a child per request until the caller closes
    the socket. In the child, ``run(target)`` starts with fds 0-2 the caller's pipes, no other
    descriptor, and this process's caller as its parent; it must not return."""
    ctrl = socket.socket(fileno=fd)
    caller = os.getppid()
    ctrl.send(json.dumps({"ready": True}).encode())
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(ctrl, 4096, 3)
        except OSError:
            return
        if not msg:
            return  # the caller closed its end
        seq = None
        try:
            req = json.loads(msg)
            seq = req.get("seq")  # echoed: the caller tells this answer from a late one to a request it gave up
            if len(fds) != 3:
                raise ValueError(f"{len(fds)} descriptors, not 3")
            reply = {"pid": _fork(ctrl, fds, str(req["target"]), str(req["cwd"]), caller, run)}
        except (OSError, ValueError, KeyError) as e:
            reply = {"error": str(e)[:300]}
        finally:
            for f in fds:
                os.close(f)
        ctrl.send(json.dumps({**reply, "seq": seq}).encode())


def _fork(ctrl: socket.socket, fds: list[int], target: str, cwd: str, caller: int, run) -> int:
    zygote = os.getpid()
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    middle = os.fork()
    if middle == 0:  # exits at once, so that the child is re-parented to the caller
        try:
            os.close(r)
            pid = os.fork()
            if pid == 0:
                os.close(w)
                # named for its zygote: an orphan of a zygote not ours is told from a late child of ours
                _libc.prctl(_PR_SET_NAME, f"clcalib-{zygote}".encode()[:15], 0, 0, 0)
                _child(ctrl, fds, target, cwd, caller, run)
            os.write(w, str(pid).encode())
        finally:
            os._exit(0)
    os.close(w)
    try:
        data = os.read(r, 32)
    finally:
        os.close(r)
        os.waitpid(middle, 0)
    if not data:
        raise OSError("the second fork failed")
    return int(data)


def _child(ctrl: socket.socket, fds: list[int], target: str, cwd: str, caller: int, run) -> None:
    code = 1
    try:
        ctrl.close()  # first: a child must never reach the zygote
        for i, f in enumerate(fds):
            os.dup2(f, i)
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))
        os.chdir(cwd)
        give_up = time.monotonic() + 10
        while os.getppid() != caller:  # until the middle process has exited
            if time.monotonic() > give_up:
                os._exit(1)  # the caller is gone, or is not a subreaper
            time.sleep(0.0005)
        run(target)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 - never back into the zygote's loop
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


# ---- shared ----------------------------------------------------------------------------------

def relay(stream, label: str) -> None:
    """A process's stderr to our log, a line at a time, labelled and bounded: it never writes ours."""
    log = logging.getLogger("clcalib.sandbox")
    left = MAX_STDERR
    for raw in iter(lambda: stream.readline(4096), b""):
        if left > 0:
            left -= len(raw)
            log.info("[%s] %s", label, raw.decode("utf-8", "replace").rstrip()[:1000])
            if left <= 0:
                log.warning("[%s] more output dropped (over %d bytes)", label, MAX_STDERR)
    stream.close()


def exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"

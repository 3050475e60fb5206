"""Payloads run inside the sandbox by tests/test_sandbox.py: each tries something an attacker's
code would, and returns what happened instead of raising."""

from __future__ import annotations

import os
import socket


def _try(fn) -> str:
    try:
        fn()
        return "allowed"
    except OSError as e:
        return f"refused: {e.strerror or e}"


def escape(*, secret_files: list[str], other_dir: str, own_input: str, out_dir: str) -> dict:
    """Reads outside the jail, network of every kind, and what the jail does allow."""
    def read(p):
        with open(p, "rb") as f:
            f.read(1)

    def write_own():
        with open(os.path.join(out_dir, "ok.txt"), "w") as f:
            f.write("ok")

    def list_other():
        os.listdir(other_dir)

    def tcp():
        socket.create_connection(("127.0.0.1", 6379), timeout=2)

    def udp():
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("127.0.0.1", 53))

    def unix():
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect("/var/run/postgresql/.s.PGSQL.5432")

    def write_other():
        with open(os.path.join(other_dir, "planted"), "w") as f:
            f.write("x")

    out = {f"read {p}": _try(lambda p=p: read(p)) for p in secret_files}
    out.update({"list other job": _try(list_other), "write other job": _try(write_other), "tcp": _try(tcp),
                "udp": _try(udp), "unix socket": _try(unix), "read own input": _try(lambda: read(own_input)),
                "write own output": _try(write_own), "uid": os.getuid(), "import torch": _try(_import_torch),
                "capabilities": _capabilities(), "env": sorted(k for k in os.environ if "KEY" in k or "URL" in k)})
    return out


def _capabilities() -> str:
    with open("/proc/self/status") as f:
        return next(line.split()[1] for line in f if line.startswith("CapEff"))


def noisy() -> str:
    """Writes to stdout (the protocol's pipe, were it not redirected) and returns."""
    print('{"result": "forged"}')
    print("garbage that is not JSON")
    return "real"


def _import_torch():
    import torch

    torch.ones(2) + 1


def allocate(*, gib: float) -> int:
    """Touch ``gib`` GiB of memory."""
    import torch

    return int(torch.ones(int(gib * 2**30 / 4)).sum())


def events(*, n: int, emit) -> str:
    for i in range(n):
        emit({"i": i})
    return "done"


def escape_resources() -> dict:
    """Ways around the memory cap and past the end of the run."""
    import mmap

    def fork():
        pid = os.fork()
        if pid == 0:
            os._exit(0)

    def shared_anonymous():
        mmap.mmap(-1, 1 << 20, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)

    def memfd():
        os.memfd_create("x")

    def thread():  # threads (clone with CLONE_THREAD) still work: torch needs them
        import threading

        t = threading.Thread(target=lambda: None)
        t.start()
        t.join()

    def private_file_map():
        mmap.mmap(-1, 1 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # counted by RLIMIT_DATA: allowed

    def keyring():  # keyctl(KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 0)
        import ctypes
        import platform

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syscall({"x86_64": 250, "aarch64": 219}[platform.machine()], 0, -3, 0) < 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))

    return {"fork": _try(fork), "shared anonymous mmap": _try(shared_anonymous), "memfd": _try(memfd),
            "keyring": _try(keyring),
            "thread": _try(thread), "private mmap": _try(private_file_map), "descriptors": _descriptors()}


def _descriptors() -> list[str]:
    """What this process's open descriptors are (pipe, socket, a file's path)."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.append(os.readlink(f"/proc/self/fd/{fd}").split(":")[0])
        except OSError:  # the listing's own descriptor, closed by now
            pass
    return sorted(out)


def linger(*, seconds: float) -> str:
    import time

    time.sleep(seconds)
    return "woke"


def _errno_of(fn) -> str:
    """Like ``_try`` for ctypes calls that return -1 and set errno."""
    import ctypes

    r = fn()
    if r == -1:
        e = ctypes.get_errno()
        return f"refused: {os.strerror(e)}"
    return "allowed"


def reach(*, pids: dict[str, int]) -> dict:
    """Every way to touch another process (the zygote, the caller, a sibling) by its pid."""
    import ctypes
    import signal

    libc = ctypes.CDLL(None, use_errno=True)
    out = {}
    for who, pid in pids.items():
        def read(p):
            with open(p, "rb") as f:
                f.read(1)

        def pidfd_getfd(pid=pid):
            pfd = libc.syscall(434, pid, 0)  # pidfd_open
            if pfd < 0:
                return -1
            try:
                for target in range(0, 8):
                    fd = libc.syscall(438, pfd, target, 0)  # pidfd_getfd
                    if fd >= 0:
                        os.close(fd)
                        return 0
                return -1
            finally:
                os.close(pfd)

        def attach(pid=pid):
            r = libc.ptrace(16, pid, None, None)  # PTRACE_ATTACH
            if r == 0:
                libc.ptrace(17, pid, None, None)  # PTRACE_DETACH
            return r

        def vm_read(pid=pid):
            buf = ctypes.create_string_buffer(8)
            local = (ctypes.c_void_p * 2)(ctypes.cast(buf, ctypes.c_void_p), 8)
            remote = (ctypes.c_void_p * 2)(0x400000, 8)
            return libc.syscall(310, pid, local, 1, remote, 1, 0)  # process_vm_readv

        out[f"{who} signal"] = _try(lambda pid=pid: os.kill(pid, signal.SIGURG))  # ignored by default: harmless
        out[f"{who} pidfd signal"] = _errno_of(lambda pid=pid: libc.syscall(424, libc.syscall(434, pid, 0), 0, None, 0))
        out[f"{who} mem"] = _try(lambda pid=pid: read(f"/proc/{pid}/mem"))
        out[f"{who} status"] = _try(lambda pid=pid: read(f"/proc/{pid}/status"))
        out[f"{who} fds"] = _try(lambda pid=pid: os.listdir(f"/proc/{pid}/fd"))
        out[f"{who} ptrace"] = _errno_of(attach)
        out[f"{who} pidfd_getfd"] = _errno_of(pidfd_getfd)
        out[f"{who} process_vm_readv"] = _errno_of(vm_read)
    return out


def state() -> dict:
    """What a process starts with that it did not choose: compared between a forked and a fresh child."""
    import ctypes
    import resource
    import signal
    import sys

    libc = ctypes.CDLL(None, use_errno=True)
    status = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("SigBlk", "SigIgn", "SigCgt", "NoNewPrivs", "Seccomp", "CapEff", "CapBnd", "CapPrm", "Umask"):
                status[k] = v.strip()
    maps, shared = set(), []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6:
                maps.add(parts[5])
            if "s" in parts[1] and "w" in parts[1]:
                shared.append(line.strip())
    pdeath = ctypes.c_int(0)
    libc.prctl(2, ctypes.byref(pdeath), 0, 0, 0)  # PR_GET_PDEATHSIG
    try:
        import numpy
        np_draw = float(numpy.random.random())
    except ImportError:
        np_draw = None
    import random

    import torch
    return {"pid": os.getpid(), "env": sorted(os.environ), "sys.path": sys.path, "cwd": os.getcwd(),
            "status": status, "maps": sorted(maps), "shared writable maps": shared, "fds": _descriptors(),
            "rlimits": {n: resource.getrlimit(getattr(resource, n)) for n in dir(resource) if n.startswith("RLIMIT_")},
            "signals": {s.name: str(signal.getsignal(s)) for s in (signal.SIGCHLD, signal.SIGPIPE, signal.SIGINT,
                                                                    signal.SIGTERM, signal.SIGXFSZ, signal.SIGHUP)},
            "pdeathsig": pdeath.value, "dumpable": libc.prctl(3, 0, 0, 0, 0),
            "hash": hash("clcalib"), "numpy draw": np_draw, "random draw": random.random(),
            "torch draw": float(torch.rand(1)), "torch seed": torch.initial_seed(),
            "threads": len(os.listdir("/proc/self/task")), "pgid": os.getpgid(0), "sid": os.getsid(0),
            "modules": len(sys.modules)}


def outlive(*, seconds: float, how: str) -> str:
    """Try to go on running once the process that started this one is gone."""
    import ctypes
    import sys
    import time

    libc = ctypes.CDLL(None, use_errno=True)
    if how == "pdeathsig":
        libc.prctl(1, 0, 0, 0, 0)  # PR_SET_PDEATHSIG: none
    elif how == "exec":
        os.execv(sys.executable, [sys.executable, "-c", f"import time; time.sleep({seconds})"])
    elif how == "setsid":
        os.setsid()
    time.sleep(seconds)
    return "woke"


def hang_up(*, seconds: float) -> str:
    """Close the answer's pipe (every descriptor past stderr), then keep running without a word."""
    import time

    os.closerange(3, 4096)
    time.sleep(seconds)
    return "woke"



def leave(*, paths: list[str]) -> dict:
    """Leave a file where a later child (another tenant's) could find it."""
    def write(p):
        with open(p, "w") as f:
            f.write("left by an earlier child")
    return {p: _try(lambda p=p: write(p)) for p in paths}


def forge(*, kind: str) -> str:
    """Write straight into the answer's pipe what no honest child sends."""
    import stat
    import time

    chan = next(fd for fd in range(3, 64) if _is_fifo(fd, stat))
    if kind == "huge":  # a line past the limit, its end never sent
        os.write(chan, b'{"event": "' + b"a" * (5 << 20))
    elif kind == "deep":
        os.write(chan, b'{"event": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n")
    time.sleep(60)
    return "woke"


def _is_fifo(fd: int, stat) -> bool:
    try:
        return stat.S_ISFIFO(os.fstat(fd).st_mode)
    except OSError:
        return False


def signal_group() -> dict:
    """Signal this process's group and every process it may (SIGURG: ignored unless handled)."""
    import signal

    return {"group": _try(lambda: os.kill(0, signal.SIGURG)), "all": _try(lambda: os.kill(-1, 0))}


def non_finite(*, emit) -> dict:
    """A diverged run: its loss NaN, a metric infinite."""
    emit({"stage": "reconstruct", "loss": float("nan"), "eta_s": float("inf")})
    return {"loss": float("-inf"), "top1": 12.5}

"""The sandbox every upload check and every calibration runs in: a new child process (forked by
a zygote that imported torch once, ``jobs.zygote``) that confines itself, before it reads one
uploaded byte, with kernel mechanisms that need no helper binary, no root and no container
privileges (so they work the same under ``clcalib serve``, in CI and in a default Docker
container):

- **Landlock** (Linux >= 5.13; ABI 4+ for TCP, 6+ for scopes): the filesystem view is the
  Python installation and system libraries (read-only), the job's own inputs (read-only) and
  its output folders plus a private temporary folder (read-write). Nothing else: not the other
  jobs, not the job database, not ``/etc`` or ``/proc`` of other processes. TCP bind/connect
  are denied, abstract Unix sockets and signals are scoped to the sandbox, and ptrace of any
  process outside it is refused.
- **seccomp** (``seccomp_program``): ``socket()`` and ``io_uring_setup()`` fail with EACCES, so
  no network of any family (TCP, UDP, a Unix socket path such as PostgreSQL's); no new process
  (a grandchild would outlive the run), no SysV shared memory, memfd or shared anonymous mmap
  (memory ``RLIMIT_DATA`` does not count); no signal to any process but itself (Landlock scopes
  signals only from ABI 6) and no clearing of its parent-death signal; foreign syscall ABIs kill
  the process.
- **rlimits**: ``RLIMIT_DATA`` caps the heap and anonymous memory (the memory cap: an
  allocation beyond it fails, the child reports it in one line naming the cap), ``RLIMIT_FSIZE``
  one file's size, no core files.
- **privileges**: ``no_new_privs``; every capability dropped (effective, permitted,
  inheritable, ambient and the bounding set); the uid/gid become ``sandbox_uid`` when the
  Python installation is reachable for it (a root install under ``/root``, 0700, is not: the
  child then stays uid 0 with no capability, and Landlock is what keeps it from root's files).
- a scrubbed environment: no API keys, database or broker URLs reach the child.

Why these and not bubblewrap/namespaces/cgroups: those need a setuid helper, user namespaces or
CAP_SYS_ADMIN, which a default Docker container does not grant; Landlock and seccomp are
unprivileged by design. What they do not cover: CPU time (the callers' timeouts), GPU memory (a
CUDA job's device memory is the driver's), and a kernel exploit.

The child speaks JSON lines on its stdout (its own prints go to stderr): nothing it sends is
ever unpickled by the parent. Children are forked by a zygote (``jobs.zygote``: ``python -m
jobs.sandbox --zygote module``) that imported the module once; a child says ``{"ready": true,
"info": module.ready_info()}``, reads one request ``{"jail": ..., "kwargs": ...}``, confines
itself, runs ``function(**kwargs)`` (with ``emit`` to send events when the function takes it)
and answers ``{"result": ...}`` or ``{"error": {"kind", "message"}}``.
"""

from __future__ import annotations

import ctypes
import importlib
import inspect
import json
import os
import platform
import resource
import site
import sys
import sysconfig
import threading
from dataclasses import asdict, dataclass, field

from jobs import zygote

MAX_LINE = 4 << 20  # one message from a child; a longer one is a protocol error
START_TIMEOUT_S = 300.0  # the zygote's imports (torch) on a loaded machine, and a fork
STOP_POLL_S = 0.25  # a run given ``stop`` notices it within this while its child sends nothing
MAX_FILE_BYTES = 16 << 30  # RLIMIT_FSIZE: one file a sandboxed run writes
SAFE_ENV = ("PATH", "LANG", "LC_ALL", "PYTHONPATH", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES",
            "CUDA_DEVICE_ORDER", "PYTHONHASHSEED", "PYTHONUNBUFFERED")


@dataclass
class Jail:
    """What one sandboxed run may touch, and its memory cap."""
    read: list[str] = field(default_factory=list)  # the job's inputs (files or folders), read-only
    write: list[str] = field(default_factory=list)  # its output folders, read-write
    tmp: str = ""  # a private folder for HOME / TMPDIR / matplotlib's cache, read-write
    memory_bytes: int = 0  # RLIMIT_DATA; 0: no cap
    uid: int = 65534  # the unprivileged uid (and gid) a root parent's child becomes
    gpu: bool = False  # allow the NVIDIA device files and driver information


class SandboxError(RuntimeError):
    """The sandbox could not be set up: the run must not go on unconfined."""


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a sandboxed child starts with: only what running Python and torch needs."""
    env = {k: os.environ[k] for k in SAFE_ENV if k in os.environ}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return {**env, **(extra or {})}


_zygotes: dict[tuple, zygote.Zygote] = {}
_zygotes_lock = threading.Lock()


def zygote_for(target: str, env: dict[str, str] | None = None) -> zygote.Zygote:
    """This process's zygote for ``target``'s module (``module:function`` or the module's name;
    started, not waited for, on first use; started again if it died)."""
    module = target.split(":")[0]
    key = (module, tuple(sorted((env or {}).items())))
    with _zygotes_lock:
        z = _zygotes.get(key)
        if z is None or not z.alive():
            if z is not None and z.owner == os.getpid():
                z.close()  # it died: its socket and status
            z = _zygotes[key] = zygote.Zygote([sys.executable, "-m", "jobs.sandbox", "--zygote", module],
                                              child_env(env))
        return z



# ---- the child side --------------------------------------------------------------------------

def _system_paths(jail: Jail) -> list[str]:
    """Read-only paths a Python process with torch needs after start-up (lazy imports, shared
    libraries, fonts, CPU topology)."""
    import importlib.util

    here = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]  # this checkout or site-packages
    pkgs = [loc for p in ("clcalib", "jobs", "service", "worker")
            for loc in (getattr(importlib.util.find_spec(p), "submodule_search_locations", None) or [])]
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, *site.getsitepackages(), sysconfig.get_paths()["stdlib"],
             *[p for p in sys.path if p and os.path.isdir(p) and p not in here], *pkgs,
             "/usr/lib", "/usr/lib64", "/lib", "/lib64", "/usr/share/fonts", "/usr/share/zoneinfo",
             "/etc/ld.so.cache", "/etc/localtime", "/dev/null", "/dev/zero", "/dev/urandom", "/dev/random",
             "/proc/cpuinfo", "/proc/meminfo", "/proc/stat", f"/proc/{os.getpid()}", "/sys/devices/system/cpu",
             "/sys/devices/system/node"}
    if jail.gpu:
        paths |= {"/proc/driver/nvidia", "/sys/bus/pci", "/sys/devices", "/usr/local/cuda"}
    paths = {os.path.abspath(p) for p in paths if os.path.exists(p)}
    if "/" in paths:  # e.g. a process started in "/" has it on sys.path: that would grant reading everything
        raise SandboxError(f"the read-only view would include '/' (sys.path: {sys.path}); start the process in "
                           "an empty folder")
    return sorted(paths)


def _devices(jail: Jail) -> list[str]:
    """Device files opened for writing (and, the GPU's, with ioctl)."""
    devs = ["/dev/null", "/dev/zero"]
    if jail.gpu:
        devs += [f"/dev/{d}" for d in os.listdir("/dev") if d.startswith("nvidia")]
    return [d for d in devs if os.path.exists(d)]


# Landlock (include/uapi/linux/landlock.h)
_SYS_CREATE, _SYS_ADD, _SYS_RESTRICT = 444, 445, 446  # the same on x86_64 and aarch64
_FS_EXECUTE, _FS_WRITE_FILE, _FS_READ_FILE, _FS_READ_DIR = 1, 2, 4, 8
_FS_ALL_V1 = (1 << 13) - 1
_FS_REFER, _FS_TRUNCATE, _FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
_FILE_RIGHTS = _FS_EXECUTE | _FS_WRITE_FILE | _FS_READ_FILE | _FS_TRUNCATE | _FS_IOCTL_DEV
_NET_BIND_TCP, _NET_CONNECT_TCP = 1, 2
_SCOPE_ABSTRACT_UNIX, _SCOPE_SIGNAL = 1, 2


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed", ctypes.c_uint64), ("fd", ctypes.c_int32)]


_libc = ctypes.CDLL(None, use_errno=True)
_PARENT = os.getppid()  # the process that started this child (a worker may be pid 1 in a container)


def _sys(*args) -> int:
    r = _libc.syscall(*[ctypes.c_long(a) if isinstance(a, int) else a for a in args])
    if r < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return r


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 when it has none (or it is disabled)."""
    try:
        return _sys(_SYS_CREATE, None, 0, 1)  # LANDLOCK_CREATE_RULESET_VERSION
    except OSError:
        return 0


def _landlock(read: list[str], write: list[str], devices: list[str]) -> int:
    abi = landlock_abi()
    if abi < 1:
        raise SandboxError("this kernel has no Landlock (Linux >= 5.13 with landlock in the LSM list): the "
                           "upload checks and calibration cannot be confined. Run on a kernel with Landlock, or "
                           "set CLCALIB_SANDBOX=off only where every uploaded model is trusted")
    fs = _FS_ALL_V1 | (_FS_REFER if abi >= 2 else 0) | (_FS_TRUNCATE if abi >= 3 else 0) | \
        (_FS_IOCTL_DEV if abi >= 5 else 0)
    attr = _RulesetAttr(fs, _NET_BIND_TCP | _NET_CONNECT_TCP if abi >= 4 else 0,
                        _SCOPE_ABSTRACT_UNIX | _SCOPE_SIGNAL if abi >= 6 else 0)
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    ruleset = _sys(_SYS_CREATE, ctypes.byref(attr), size, 0)
    reading = _FS_EXECUTE | _FS_READ_FILE | _FS_READ_DIR
    device = _FS_READ_FILE | _FS_WRITE_FILE | (_FS_IOCTL_DEV if abi >= 5 else 0)
    for paths, rights in ((read, reading), (write, fs), (devices, device)):
        for p in paths:
            fd = os.open(p, os.O_PATH | os.O_CLOEXEC)
            try:
                allowed = rights if os.path.isdir(p) else rights & _FILE_RIGHTS
                rule = _PathBeneath(allowed & fs, fd)
                _sys(_SYS_ADD, ruleset, 1, ctypes.byref(rule), 0)  # LANDLOCK_RULE_PATH_BENEATH
            finally:
                os.close(fd)
    return ruleset


# seccomp: a classic BPF filter (include/uapi/linux/filter.h, seccomp.h). Per architecture: the
# audit arch and the syscall numbers of what is refused.
_ARCH = {
    "x86_64": {"audit": 0xC000003E, "x32": True, "clone": 56, "clone3": 435, "mmap": 9, "prctl": 157,
               "deny": {"socket": 41, "io_uring_setup": 425, "fork": 57, "vfork": 58, "shmget": 29, "shmat": 30,
                        "semget": 64, "msgget": 68, "memfd_create": 319, "tkill": 200, "pidfd_send_signal": 424,
                        "add_key": 248, "request_key": 249, "keyctl": 250},
               "signal": {"kill": 62, "tgkill": 234, "rt_sigqueueinfo": 129, "rt_tgsigqueueinfo": 297}},
    "aarch64": {"audit": 0xC00000B7, "x32": False, "clone": 220, "clone3": 435, "mmap": 222, "prctl": 167,
                "deny": {"socket": 198, "io_uring_setup": 425, "shmget": 194, "shmat": 196, "semget": 190,
                         "msgget": 186, "memfd_create": 279, "tkill": 130, "pidfd_send_signal": 424,
                         "add_key": 217, "request_key": 218, "keyctl": 219},
                "signal": {"kill": 129, "tgkill": 131, "rt_sigqueueinfo": 138, "rt_tgsigqueueinfo": 240}},
}
_CLONE_THREAD, _MAP_SHARED_ANONYMOUS, _PR_SET_PDEATHSIG = 0x10000, 0x21, 1


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


def seccomp_program(machine: str, pid: int) -> list[tuple[int, int, int, int]]:
    """The filter: no sockets, io_uring, SysV IPC or memfd (shared memory outside RLIMIT_DATA);
    no new process (fork, vfork, clone without CLONE_THREAD: a grandchild would outlive the run;
    clone3 answers ENOSYS, so glibc falls back to clone for threads); no shared anonymous mmap;
    no PR_SET_PDEATHSIG (clearing it would let the process outlive its caller as an orphan);
    no signal to any process but ``pid`` (itself); no kernel keyrings (a child left at uid 0
    would share root's); a foreign syscall ABI kills the process."""
    a = _ARCH[machine]
    ld, jeq, jset, ret, alu_and = 0x20, 0x15, 0x45, 0x06, 0x54
    code: list = []  # instructions; jumps name labels, resolved below

    def jump(op, k, yes, no="next"):
        code.append((op, yes, no, k))
    code += [(ld, 0, 0, 4)]
    jump(jeq, a["audit"], "next", "kill")
    code += [(ld, 0, 0, 0)]
    if a["x32"]:
        jump(0x35, 0x40000000, "deny")  # jge: x32 syscalls
    for nr in a["deny"].values():
        jump(jeq, nr, "deny")
    jump(jeq, a["clone3"], "enosys")
    jump(jeq, a["clone"], "clone")
    jump(jeq, a["mmap"], "mmap")
    jump(jeq, a["prctl"], "prctl")
    for nr in a["signal"].values():
        jump(jeq, nr, "signal")
    code += [("allow",)]
    labels = {"clone": len(code)}
    code += [(ld, 0, 0, 16)]  # args[0], low 32 bits: clone's flags
    jump(jset, _CLONE_THREAD, "allow", "deny")
    labels["mmap"] = len(code)
    code += [(ld, 0, 0, 16 + 3 * 8), (alu_and, 0, 0, _MAP_SHARED_ANONYMOUS)]  # args[3]: mmap's flags
    jump(jeq, _MAP_SHARED_ANONYMOUS, "deny", "allow")
    labels["prctl"] = len(code)
    code += [(ld, 0, 0, 16)]  # args[0]: prctl's option; the death signal stays the one enter() set
    jump(jeq, _PR_SET_PDEATHSIG, "deny", "allow")
    labels["signal"] = len(code)
    # args[0]: the target (kill's pid, a tgid); Landlock scopes signals only from ABI 6 (Linux 6.12)
    code += [(ld, 0, 0, 16)]
    jump(jeq, pid, "allow", "deny")
    for name, value in (("allow", 0x7FFF0000), ("deny", 0x00050000 | 13), ("enosys", 0x00050000 | 38),
                        ("kill", 0x80000000)):
        labels[name] = len(code)
        code.append((ret, 0, 0, value))
    out = []
    for i, ins in enumerate(code):
        if ins == ("allow",):
            ins = (ret, 0, 0, 0x7FFF0000)
        op, jt, jf, k = ins
        if isinstance(jt, str) or isinstance(jf, str):
            jt = 0 if jt == "next" else labels[jt] - i - 1
            jf = 0 if jf == "next" else labels[jf] - i - 1
        out.append((op, jt, jf, k))
    return out


def _seccomp() -> None:
    machine = platform.machine()
    if machine not in _ARCH:
        raise SandboxError(f"no seccomp filter for {machine}; supported: {', '.join(_ARCH)}")
    prog = seccomp_program(machine, os.getpid())
    filt = (_SockFilter * len(prog))(*[_SockFilter(*ins) for ins in prog])
    fprog = _SockFprog(len(prog), filt)
    if _libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
        raise SandboxError(f"seccomp filter refused: {os.strerror(ctypes.get_errno())}")


def _readable_by(path: str, uid: int, gid: int) -> bool:
    """Whether ``uid`` can reach and read ``path`` (every folder on the way searchable)."""
    parts = os.path.abspath(path).split(os.sep)
    for i in range(1, len(parts) + 1):
        p = os.sep.join(parts[:i]) or os.sep
        st = os.stat(p)
        bit = 1 if os.path.isdir(p) else 4
        who = 6 if st.st_uid == uid else 3 if st.st_gid == gid else 0
        if not (st.st_mode >> who) & bit:
            return False
    return True


def _drop_privileges(jail: Jail) -> str:
    """Capabilities gone; the unprivileged uid where the interpreter is reachable for it."""
    how = f"uid {os.getuid()}"
    if os.getuid() == 0 and _readable_by(sys.executable, jail.uid, jail.uid) and \
            _readable_by(os.path.dirname(inspect.__file__), jail.uid, jail.uid):
        for p in jail.write + [jail.tmp]:
            for root, dirs, files in os.walk(p):  # never through a link: it could name any file
                for n in [root, *(os.path.join(root, d) for d in dirs), *(os.path.join(root, f) for f in files)]:
                    if not os.path.islink(n):
                        os.chown(n, jail.uid, jail.uid, follow_symlinks=False)
        os.setgroups([])
        os.setresgid(jail.uid, jail.uid, jail.uid)
        os.setresuid(jail.uid, jail.uid, jail.uid)
        how = f"uid {jail.uid}"
    for cap in range(64):  # the bounding set: nothing regained by an exec
        if _libc.prctl(24, cap, 0, 0, 0) != 0 and ctypes.get_errno() == 22:  # PR_CAPBSET_DROP; EINVAL: no more caps
            break
    _libc.prctl(47, 4, 0, 0, 0)  # PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()
    if _libc.capset(header, data) != 0:
        raise SandboxError(f"could not drop capabilities: {os.strerror(ctypes.get_errno())}")
    return how + ", no capabilities"


def enter(jail: Jail) -> str:
    """Confine this process (irreversibly). Returns a one-line description of what holds."""
    os.makedirs(jail.tmp, exist_ok=True)
    for k in ("HOME", "TMPDIR", "MPLCONFIGDIR", "XDG_CACHE_HOME"):
        os.environ[k] = jail.tmp
    import tempfile

    tempfile.tempdir = jail.tmp
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (MAX_FILE_BYTES, MAX_FILE_BYTES))
    if jail.memory_bytes:
        resource.setrlimit(resource.RLIMIT_DATA, (jail.memory_bytes, jail.memory_bytes))
    read = _system_paths(jail) + [p for p in jail.read if os.path.exists(p)]
    write = [p for p in [*jail.write, jail.tmp] if os.path.exists(p)]
    ruleset = _landlock(read, write, _devices(jail))
    if _libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise SandboxError("could not set no_new_privs")
    who = _drop_privileges(jail)
    _sys(_SYS_RESTRICT, ruleset, 0)
    os.close(ruleset)
    _die_with_parent()  # again: a change of uid clears it
    _seccomp()
    return f"landlock ABI {landlock_abi()}, seccomp (no sockets), {who}, memory cap " + \
        (f"{jail.memory_bytes / 2**30:.1f} GiB" if jail.memory_bytes else "none")


def is_out_of_memory(e: BaseException | str) -> bool:
    """An allocation refused under the cap, however the code that met it worded it (a library
    that turns it into its own error keeps errno's text, sometimes cut short)."""
    text = str(e)
    return isinstance(e, MemoryError) or "can't allocate memory" in text or "not enough memory" in text \
        or "Cannot allocate memor" in text or "ENOMEM" in text


def _die_with_parent() -> None:
    """SIGKILL when the worker or API process that started this child dies, however it dies."""
    import signal

    _libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != _PARENT:  # it died before the line above
        os._exit(1)


def _stop_signals_to_caller(mod) -> None:
    """A module that sets ``STOP_SIGNALS_TO_CALLER`` (the calibration's) leaves a stop signal to
    its caller's process group (Ctrl-C in a terminal, a service manager's SIGTERM to every
    process) to the caller, which hands its job back and kills this child itself: the child
    dying of it first would fail the job. The API's checks keep the default: killed with it."""
    import signal

    if getattr(mod, "STOP_SIGNALS_TO_CALLER", False):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def zygote_main(module: str, fd: int) -> None:
    """The zygote: the module's heavy imports once (nothing untrusted is read here), then a fork
    per child (``jobs.zygote.serve``)."""
    _die_with_parent()
    zygote.name_zygote()
    os.dup2(2, 1)  # the imports' prints go to the log
    mod = importlib.import_module(module)
    _stop_signals_to_caller(mod)
    if hasattr(mod, "warm_sandbox_child"):
        mod.warm_sandbox_child()  # heavy imports (torch) before any upload is read
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():  # a forked child could not use the GPU
        raise SandboxError(f"importing {module} initialised CUDA; the zygote must fork before that")
    if threading.active_count() != 1:
        raise SandboxError(f"the zygote runs {threading.active_count()} Python threads after importing {module}; "
                           "it must fork from one")
    caller = os.getppid()

    def child(target: str) -> None:
        global _PARENT
        _PARENT = caller  # the child's parent after re-parenting
        main(target)
    zygote.serve(fd, child)


def main(target: str) -> None:
    _die_with_parent()
    chan = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # the function's own prints go to stderr, never into the protocol

    def send(obj) -> None:
        chan.write(json.dumps(obj, default=str) + "\n")

    module, name = target.split(":")
    mod = importlib.import_module(module)
    _stop_signals_to_caller(mod)
    if hasattr(mod, "warm_sandbox_child"):
        mod.warm_sandbox_child()  # heavy imports (torch) before any upload is read
    fn = getattr(mod, name)
    # what the module tells its parent before any upload is read (trusted: nothing untrusted ran yet)
    send({"ready": True, "info": mod.ready_info() if hasattr(mod, "ready_info") else None})
    request = json.loads(sys.stdin.readline(MAX_LINE) or "null")
    if not request:
        return
    jail = Jail(**request["jail"])
    off = request.get("off", False)
    try:
        how = "off (CLCALIB_SANDBOX=off)" if off else enter(jail)
    except (SandboxError, OSError) as e:
        send({"error": {"kind": "sandbox", "message": f"the sandbox could not be set up: {e}"}})
        return
    send({"sandbox": how})
    kwargs = request["kwargs"]
    if "emit" in inspect.signature(fn).parameters:
        kwargs["emit"] = lambda ev: send({"event": ev})
    try:
        result = fn(**kwargs)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which decides
        kind = "memory" if is_out_of_memory(e) else "exception"
        send({"error": {"kind": kind, "type": type(e).__name__, "message": str(e)[:2000]}})
        return
    send({"result": result, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024})


# ---- the parent side -------------------------------------------------------------------------

def _finite_or_none(text: str) -> float | None:
    import math

    v = float(text)
    return v if math.isfinite(v) else None


class ChildFailed(RuntimeError):
    """A sandboxed run ended without a result: ``kind`` is "sandbox", "memory", "exception",
    "timeout", "died", "protocol" or "stopped" (its caller's ``stop`` was set); ``message`` says
    what happened, for a person."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind, self.message = kind, message


class Child:
    """One sandboxed child process for one run, forked by its module's zygote when first waited
    for (constructing one never blocks: it only makes sure the zygote's imports are under way)."""

    def __init__(self, target: str, env: dict[str, str] | None = None):
        import tempfile

        self.cwd = tempfile.mkdtemp(prefix="clcalib-sandbox-")
        self.target, self._env = target, env
        zygote_for(target, env)
        self.proc: zygote.Forked | None = None
        self._closed = False
        self._proc_lock = threading.Lock()
        self._buf = b""
        self._ready_lock = threading.Lock()
        self.ready = False
        self.info = None  # what the module said with its "ready" (``ready_info``)
        self.how = ""
        self.peak_rss_bytes = 0

    def _line(self, deadline: float | None, stop: threading.Event | None = None) -> dict:
        import select
        import time

        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            # checked while the child is silent too: a child may send nothing for minutes (one long
            # evaluation pass), and its caller must not wait for its next message to stop it
            if stop is not None and stop.is_set():
                raise ChildFailed("stopped", "the run was stopped by its caller")
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise ChildFailed("timeout", "timed out")
            wait = left if stop is None else STOP_POLL_S if left is None else min(left, STOP_POLL_S)
            if not select.select([fd], [], [], wait)[0]:
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                # a process that closed its pipe but runs on is not waited for past a few seconds (or its time)
                code = self.proc.wait(5.0 if deadline is None else max(0.5, min(5.0, deadline - time.monotonic())))
                if code is None:
                    self.proc.kill()
                    self.proc.wait()
                    raise ChildFailed("protocol", "the process closed its answer's pipe and did not exit; killed")
                raise ChildFailed("died", f"the process ended without an answer ({zygote.exit_text(code)})")
            self._buf += chunk
            if len(self._buf) > MAX_LINE and b"\n" not in self._buf:
                raise ChildFailed("protocol", "the process sent a message over the size limit")
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            # NaN/Infinity (a diverged loss, or a hostile child) as null: the job's status is strict JSON
            msg = json.loads(line, parse_constant=lambda _: None, parse_float=_finite_or_none)
        except (ValueError, RecursionError):
            raise ChildFailed("protocol", "the process sent something that is not a message") from None
        if not isinstance(msg, dict):
            raise ChildFailed("protocol", "the process sent something that is not a message")
        return msg

    def wait_ready(self, timeout: float, stop: threading.Event | None = None) -> None:
        import time

        with self._ready_lock:  # a warm-up and the run may both wait for it
            if not self.ready:
                deadline = time.monotonic() + timeout
                if self.proc is None:
                    self._fork(timeout)
                msg = self._line(deadline, stop)
                if msg.get("ready") is not True:
                    raise ChildFailed("protocol", "the process did not start")
                self.info, self.ready = msg.get("info"), True

    def _fork(self, timeout: float) -> None:
        try:
            proc = zygote_for(self.target, self._env).spawn(self.target, self.cwd, timeout)
        except zygote.ZygoteFailed as e:
            raise ChildFailed("sandbox", f"no sandboxed process could be started: {e}") from None
        # its stderr goes to our log, a line at a time, labelled and bounded: it never writes ours
        threading.Thread(target=zygote.relay, args=(proc.stderr, f"sandbox {proc.pid}"), daemon=True).start()
        with self._proc_lock:
            self.proc = proc
            closed = self._closed
        if closed:  # closed while it was being forked
            self.close()
            raise ChildFailed("died", "the process was stopped before it started")

    def run(self, jail: Jail, kwargs: dict, timeout: float, on_event=None, off: bool = False,
            stop: threading.Event | None = None):
        """The function's result; raises ChildFailed. The child is gone afterwards. ``stop``: once
        set (by another thread), the child is killed within STOP_POLL_S, whatever it is doing,
        and the run raises ChildFailed("stopped")."""
        import time

        try:
            if stop is not None and stop.is_set():
                raise ChildFailed("stopped", "the run was stopped by its caller")
            self.wait_ready(START_TIMEOUT_S, stop)  # its imports are not the function's time
            deadline = time.monotonic() + timeout
            self.proc.stdin.write((json.dumps({"jail": asdict(jail), "kwargs": kwargs, "off": off}) + "\n").encode())
            self.proc.stdin.flush()
            while True:
                msg = self._line(deadline, stop)
                if "event" in msg:
                    if on_event is not None:
                        try:
                            on_event(msg["event"])
                        except (TypeError, ValueError, KeyError, AttributeError, RecursionError) as e:
                            raise ChildFailed("protocol", f"the process sent an event that is not one ({e})"[:300]) from None
                elif "sandbox" in msg:
                    self.how = str(msg["sandbox"])[:300]
                elif "error" in msg:
                    err = msg["error"] if isinstance(msg["error"], dict) else {}
                    raise ChildFailed(str(err.get("kind", "exception")), str(err.get("message", ""))[:2000])
                elif "result" in msg:
                    peak = msg.get("peak_rss_bytes")
                    self.peak_rss_bytes = peak if isinstance(peak, int) and 0 <= peak < 1 << 50 else 0
                    return msg["result"]
        finally:
            self.close()

    def close(self) -> None:
        import shutil

        with self._proc_lock:
            self._closed = True
            proc = self.proc
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for f in (proc.stdin, proc.stdout):  # stderr: its relay thread closes it at EOF
                try:
                    f.close()
                except OSError:
                    pass
        shutil.rmtree(self.cwd, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1] == "--zygote":
        zygote_main(sys.argv[2], int(sys.argv[3]))
    else:
        main(sys.argv[1])

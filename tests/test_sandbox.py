"""The sandbox itself (issue 24): a Python payload run inside it, as a hostile upload's code
would run, cannot read /etc/passwd, another job's folder or the job database, cannot write
outside its output folder, opens no socket of any kind, holds no capability and gets none of
the service's secrets; an allocation past the memory cap fails in one line naming it, and the
next child runs normally."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from clcalib.testing import process_state
from jobs.sandbox import Child, ChildFailed, Jail, landlock_abi

HERE = Path(__file__).parent
# the payload module, and this checkout before any installed copy of it (an editable install of another
# checkout would otherwise run its jobs.sandbox in the children); the child gets no other variable of ours
ENV = {"PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent)])}

pytestmark = pytest.mark.skipif(landlock_abi() < 4, reason="this kernel has no Landlock ABI >= 4")


@pytest.fixture
def data_dir(tmp_path):
    """A service's data folder: the job database and two jobs' folders."""
    d = tmp_path / "data"
    (d / "jobs" / "mine" / "inputs").mkdir(parents=True)
    (d / "jobs" / "mine" / "out").mkdir()
    (d / "jobs" / "other" / "out").mkdir(parents=True)
    (d / "jobs" / "mine" / "inputs" / "model.safetensors").write_bytes(b"weights")
    (d / "jobs" / "other" / "out" / "quantized.safetensors").write_bytes(b"another tenant's model")
    db = sqlite3.connect(d / "jobs.db")
    db.execute("create table t (x)")
    db.commit()
    db.close()
    return d


def test_a_payload_inside_reads_writes_and_connects_nothing_outside_its_job(data_dir, monkeypatch):
    monkeypatch.setenv("CLCALIB_API_KEYS", "secret-key:acme")  # the service's secrets: not passed on
    monkeypatch.setenv("CLCALIB_DATABASE_URL", "postgresql://u:pw@127.0.0.1/test")
    mine, other = data_dir / "jobs" / "mine", data_dir / "jobs" / "other"
    child = Child("sandbox_payloads:escape", ENV)
    r = child.run(Jail(read=[str(mine / "inputs")], write=[str(mine / "out")], tmp=str(mine / "tmp")),
                  {"secret_files": ["/etc/passwd", str(data_dir / "jobs.db"), str(other / "out" / "quantized.safetensors"),
                                    "/proc/1/environ", str(HERE.parent / "pyproject.toml")],
                   "other_dir": str(other / "out"), "own_input": str(mine / "inputs" / "model.safetensors"),
                   "out_dir": str(mine / "out")}, timeout=120)
    refused = {k: v for k, v in r.items() if isinstance(v, str) and v.startswith("refused")}
    for what in ["read /etc/passwd", f"read {data_dir / 'jobs.db'}", f"read {other / 'out' / 'quantized.safetensors'}",
                 "read /proc/1/environ", f"read {HERE.parent / 'pyproject.toml'}", "list other job", "write other job",
                 "tcp", "udp", "unix socket"]:
        assert what in refused, (what, r)
    assert r["read own input"] == "allowed" and r["write own output"] == "allowed", r
    assert r["import torch"] == "allowed", r  # the library still loads inside
    assert r["capabilities"] == "0000000000000000", r
    assert r["env"] == [], r
    assert os.getuid() != 0 or r["uid"] in (0, 65534), r
    assert not (other / "out" / "planted").exists()
    assert (other / "out" / "quantized.safetensors").read_bytes() == b"another tenant's model"
    assert "landlock ABI" in child.how and "seccomp" in child.how, child.how


def test_memory_past_the_cap_fails_in_one_line_and_the_next_child_runs(tmp_path):
    big = Child("sandbox_payloads:allocate", ENV)
    with pytest.raises(ChildFailed) as e:
        big.run(Jail(tmp=str(tmp_path / "a"), memory_bytes=1536 << 20), {"gib": 2.0}, timeout=120)
    assert e.value.kind == "memory" and "can't allocate memory" in e.value.message, e.value
    small = Child("sandbox_payloads:allocate", ENV)
    assert small.run(Jail(tmp=str(tmp_path / "b"), memory_bytes=1536 << 20), {"gib": 0.25}, timeout=120) > 0


def test_the_childs_own_output_cannot_forge_a_result(tmp_path):
    events = []
    assert Child("sandbox_payloads:events", ENV).run(Jail(tmp=str(tmp_path / "e")), {"n": 3}, 60, events.append) == "done"
    assert events == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert Child("sandbox_payloads:noisy", ENV).run(Jail(tmp=str(tmp_path / "n")), {}, 60) == "real"


def test_no_process_outlives_the_run_and_no_memory_escapes_the_cap(tmp_path):
    r = Child("sandbox_payloads:escape_resources", ENV).run(Jail(tmp=str(tmp_path / "t")), {}, 60)
    assert r["fork"].startswith("refused") and r["shared anonymous mmap"].startswith("refused"), r
    assert r["memfd"].startswith("refused") and r["keyring"].startswith("refused"), r
    assert r["thread"] == "allowed" and r["private mmap"] == "allowed", r
    # forked by the zygote, it holds its pipes and nothing else: never the zygote's socket, through
    # which it could ask for a sibling that is not confined
    assert "socket" not in r["descriptors"] and set(r["descriptors"]) <= {"pipe", "/dev/null"}, r["descriptors"]


def test_links_a_run_leaves_in_its_outputs_are_never_served(tmp_path):
    """A sandboxed run cannot read /etc/shadow, but it could leave out/report.json -> /etc/shadow
    for the API to serve: the worker removes every entry of out/ and resume/ that is not a plain
    file once the run is over, and the API serves plain files only."""
    from jobs.storage import Storage

    st = Storage(tmp_path / "data")
    out = st.out_dir("j1")
    out.mkdir(parents=True)
    secret = tmp_path / "secret"
    secret.write_text("the job database")
    (out / "report.json").symlink_to(secret)
    os.link(secret, out / "model.onnx")  # a second name of a file outside
    (out / "quantized.safetensors").write_bytes(b"ok")
    assert st.artifacts("j1") == ["quantized.safetensors"]
    assert st.artifact_path("j1", "report.json") is None and st.artifact_path("j1", "model.onnx") is None
    assert sorted(st.sanitize("j1")) == ["out/model.onnx", "out/report.json"]
    assert secret.read_text() == "the job database"
    assert sorted(p.name for p in out.iterdir()) == ["quantized.safetensors"]


def _state(pid: int) -> str:
    """A process's state letter ("Z" for a zombie), "" once it is gone (reaping it if it is ours:
    a process that started a zygote is a child subreaper)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    return process_state(pid)


def _running_sibling(tmp_path):
    """Another run's child, lingering 30 s in a thread of this process: (its Child, the thread)."""
    import threading

    sibling = Child("sandbox_payloads:linger", ENV)
    sibling.wait_ready(300)

    def run_sibling():
        try:
            sibling.run(Jail(tmp=str(tmp_path / "s")), {"seconds": 30}, 60)
        except ChildFailed:  # killed once the probe is done
            pass
    t = threading.Thread(target=run_sibling, daemon=True)
    t.start()
    return sibling, t


def _caller_with_a_running_child(tmp_path) -> tuple[subprocess.Popen, int, int]:
    """A process (a worker, say) whose sandboxed child is running: it, the child's pid, its zygote's pid."""
    script = textwrap.dedent(f"""
        import tempfile
        from jobs.sandbox import Child, Jail, zygote_for
        c = Child("sandbox_payloads:linger", {ENV!r})
        c.wait_ready(300)
        print(c.proc.pid, zygote_for("sandbox_payloads", {ENV!r}).proc.pid, flush=True)
        c.run(Jail(tmp=tempfile.mkdtemp()), {{"seconds": 600}}, 900)
    """)
    caller = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, cwd=tmp_path,
                              env={**os.environ, "PYTHONPATH": str(HERE.parent)})
    child, zygote = map(int, caller.stdout.readline().split())
    return caller, child, zygote


def test_a_child_belongs_to_the_process_that_asked_and_dies_with_it(tmp_path):
    """Children are forked by a zygote that imported torch once, but each is re-parented to the
    process that asked for it: that process waits for it and kills it, and when it is SIGKILLed
    itself (the OOM killer on a worker) its zygote and its running child are gone in seconds."""
    caller, child, zygote = _caller_with_a_running_child(tmp_path)
    try:
        with open(f"/proc/{child}/stat") as f:
            assert int(f.read().rsplit(")", 1)[1].split()[1]) == caller.pid  # its parent: the caller
        assert _state(child) not in ("", "Z") and _state(zygote) not in ("", "Z")
    finally:
        caller.kill()
        caller.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (_state(child) not in ("", "Z") or _state(zygote) not in ("", "Z")):
        time.sleep(0.1)
    assert _state(child) in ("", "Z") and _state(zygote) in ("", "Z"), "a sandboxed process outlived its caller"


def test_a_child_starts_without_importing_torch_again(tmp_path):
    """The zygote imports torch once; a check or a job's process is then forked, ready in well
    under the ~4 s of CPU a fresh interpreter spends importing torch (most of a small upload
    check's time before)."""
    Child("sandbox_payloads:events", ENV).run(Jail(tmp=str(tmp_path / "w")), {"n": 0}, 300)  # the zygote is up
    starts = []
    for i in range(5):
        t = time.monotonic()
        c = Child("sandbox_payloads:events", ENV)
        c.wait_ready(60)
        starts.append(time.monotonic() - t)
        assert c.run(Jail(tmp=str(tmp_path / str(i))), {"n": 1}, 60) == "done"
    assert sorted(starts)[2] < 0.5, starts


@pytest.mark.parametrize("how", ["pdeathsig", "exec", "setsid"])
def test_a_child_cannot_outlive_its_caller_whatever_it_does(tmp_path, how):
    """Code inside may clear its parent-death signal (prctl), exec a new program or start its own
    session: when its caller is SIGKILLed it still dies, instead of running on as an orphan."""
    script = textwrap.dedent(f"""
        import tempfile
        from jobs.sandbox import Child, Jail
        c = Child("sandbox_payloads:outlive", {ENV!r})
        c.wait_ready(300)
        print(c.proc.pid, flush=True)
        c.run(Jail(tmp=tempfile.mkdtemp()), {{"seconds": 600, "how": {how!r}}}, 900)
    """)
    caller = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, cwd=tmp_path,
                              env={**os.environ, "PYTHONPATH": str(HERE.parent)})
    try:
        child = int(caller.stdout.readline())
        time.sleep(1.5)  # the payload has run
        assert _state(child) not in ("", "Z")
    finally:
        caller.kill()
        caller.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _state(child) not in ("", "Z"):
        time.sleep(0.1)
    try:
        assert _state(child) in ("", "Z"), f"a sandboxed process outlived its caller ({how})"
    finally:
        if _state(child) not in ("", "Z"):
            os.kill(child, 9)  # still alive, so its pid is still its own


def test_a_child_that_closes_its_answer_pipe_is_stopped_at_its_timeout(tmp_path):
    """Code inside that closes the pipe it answers on and runs on (a check never answering) is
    killed by its run's timeout, not waited for until it chooses to exit: a check slot, a
    worker's job, is never held past its time."""
    t = time.monotonic()
    with pytest.raises(ChildFailed) as e:
        Child("sandbox_payloads:hang_up", ENV).run(Jail(tmp=str(tmp_path / "h")), {"seconds": 60}, timeout=3)
    assert time.monotonic() - t < 20, f"the run took {time.monotonic() - t:.0f} s with a timeout of 3 s"
    assert e.value.kind == "protocol", e.value


def test_closing_a_run_from_another_thread_stops_its_child_at_once(tmp_path):
    """The API's shutdown or a worker's cancel closes a run from another thread: it kills the
    child at once, even while the run's own thread is waiting for that child to exit."""
    import threading

    c = Child("sandbox_payloads:hang_up", ENV)
    c.wait_ready(60)
    errors = []

    def run():
        try:
            c.run(Jail(tmp=str(tmp_path / "h")), {"seconds": 60}, timeout=300)
        except ChildFailed as e:
            errors.append(e)
    t = threading.Thread(target=run)
    t.start()
    time.sleep(1.5)  # the pipe is closed; the run's thread is waiting for the process
    t0 = time.monotonic()
    c.close()
    assert time.monotonic() - t0 < 10, f"close() took {time.monotonic() - t0:.0f} s"
    assert c.proc.returncode is not None
    t.join(10)
    assert not t.is_alive() and errors, errors


def test_a_runs_stop_kills_a_child_that_sends_nothing(tmp_path):
    """A worker's heartbeat that finds its job canceled sets the run's ``stop``: the child is killed
    within STOP_POLL_S even while it sends nothing (a long evaluation pass), not at its next
    message, and the run says it was stopped."""
    import threading

    from jobs.sandbox import STOP_POLL_S

    c = Child("sandbox_payloads:linger", ENV)
    c.wait_ready(300)
    stop = threading.Event()
    threading.Timer(1.0, stop.set).start()
    t = time.monotonic()
    with pytest.raises(ChildFailed) as e:
        c.run(Jail(tmp=str(tmp_path / "s")), {"seconds": 60}, 120, stop=stop)
    took = time.monotonic() - t
    assert e.value.kind == "stopped", e.value
    assert took < 1.0 + STOP_POLL_S + 2, f"the run ended {took:.1f} s after it started, its stop set at 1 s"
    assert _state(c.proc.pid) in ("", "Z")


def _zombies() -> list[int]:
    """This process's children that ended and were never waited for."""
    out = []
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{p}/stat") as f:
                state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
        except (FileNotFoundError, ProcessLookupError):
            continue
        if state == "Z" and int(ppid) == os.getpid():
            out.append(int(p))
    return out


def test_a_fork_the_caller_gave_up_on_is_never_handed_to_the_next_run(tmp_path):
    """A zygote too slow to answer (a loaded machine) fails that run; its late child must not be
    taken for the next run's: that run's process would be one its caller cannot kill or time out,
    and the late one a zombie in the API or worker."""
    import signal

    from jobs.sandbox import zygote_for

    Child("sandbox_payloads:events", ENV).run(Jail(tmp=str(tmp_path / "w")), {"n": 0}, 300)  # the zygote is up
    z, before = zygote_for("sandbox_payloads", ENV), set(_zombies())
    os.kill(z.proc.pid, signal.SIGSTOP)  # as slow as it gets
    try:
        late = Child("sandbox_payloads:state", ENV)
        with pytest.raises(ChildFailed) as e:
            late.wait_ready(0.5)
        assert e.value.kind == "sandbox", e.value
        late.close()
    finally:
        os.kill(z.proc.pid, signal.SIGCONT)
    c = Child("sandbox_payloads:state", ENV)
    c.wait_ready(60)
    forked = c.proc.pid
    assert c.run(Jail(tmp=str(tmp_path / "s")), {}, 60)["pid"] == forked  # the run was the process it waited for
    deadline = time.monotonic() + 5
    while set(_zombies()) - before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not set(_zombies()) - before


def test_the_zygote_outlives_the_thread_that_started_it(tmp_path):
    """The API starts or restarts a zygote from whatever thread first needs it (a request's pool
    thread, which ends when idle): the zygote dies with the process, not with that thread, so a
    check does not pay for torch's import again, nor fail mid-request."""
    import threading

    from jobs.sandbox import zygote_for

    env = {**ENV, "CLCALIB_TEST_ZYGOTE": "thread"}  # a zygote of its own
    box = {}

    def first():
        box["z"] = zygote_for("sandbox_payloads", env)
        assert Child("sandbox_payloads:events", env).run(Jail(tmp=str(tmp_path / "a")), {"n": 0}, 300) == "done"
    t = threading.Thread(target=first)
    t.start()
    t.join()
    time.sleep(1)
    assert box["z"].alive(), f"the zygote ended with its thread ({box['z'].proc.returncode})"
    assert zygote_for("sandbox_payloads", env) is box["z"]
    assert Child("sandbox_payloads:events", env).run(Jail(tmp=str(tmp_path / "b")), {"n": 0}, 60) == "done"


def test_a_child_cannot_signal_trace_or_read_the_zygote_its_caller_or_a_sibling(tmp_path):
    """Code inside knows (or guesses) the pids of the zygote that forked it, of the API or worker
    that runs it and of another tenant's running child: it can signal none of them, ptrace none,
    read none's memory, descriptors or status, take none's descriptor (pidfd_getfd)."""

    from jobs.sandbox import zygote_for

    sibling, t = _running_sibling(tmp_path)
    try:
        pids = {"zygote": zygote_for("sandbox_payloads", ENV).proc.pid, "caller": os.getpid(),
                "sibling": sibling.proc.pid, "init": 1}
        r = Child("sandbox_payloads:reach", ENV).run(Jail(tmp=str(tmp_path / "r")), {"pids": pids}, 60)
    finally:
        sibling.close()
        t.join(10)
    assert len(r) == 4 * 8 and all(v.startswith("refused") for v in r.values()), r


def test_a_forked_child_starts_as_a_fresh_interpreter_would(tmp_path):
    """Forked from a long-lived zygote rather than started fresh, a child holds nothing more:
    the same environment, descriptors, mappings (none shared and writable: nothing a child
    writes reaches the zygote or a sibling), limits, signal mask and dispositions, death signal;
    and its random generators are its own, not the zygote's copied into every child."""
    import json

    from jobs.sandbox import child_env

    forked = [Child("sandbox_payloads:state", ENV).run(Jail(tmp=str(tmp_path / f"f{i}")), {}, 60) for i in range(2)]
    cwd = tmp_path / "fresh"
    cwd.mkdir()
    p = subprocess.Popen([sys.executable, "-m", "jobs.sandbox", "sandbox_payloads:state"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env(ENV), cwd=cwd)
    out, _ = p.communicate((json.dumps({"jail": {"tmp": str(tmp_path / "t")}, "kwargs": {}}) + "\n").encode(), 300)
    fresh = next(m["result"] for m in map(json.loads, out.decode().splitlines()) if "result" in m)
    for f in forked:
        for k in ("env", "status", "rlimits", "signals", "pdeathsig", "dumpable", "pgid", "sid"):
            assert f[k] == fresh[k], (k, f[k], fresh[k])
        assert set(f["fds"]) == set(fresh["fds"]), (f["fds"], fresh["fds"])
        assert set(f["maps"]) <= set(fresh["maps"]), sorted(set(f["maps"]) - set(fresh["maps"]))
        assert f["shared writable maps"] == [] and f["threads"] <= fresh["threads"], f
        assert f["sys.path"][1:] == fresh["sys.path"][1:], (f["sys.path"], fresh["sys.path"])
        assert os.listdir(f["sys.path"][0]) == []  # the zygote's folder, on every child's sys.path: empty
    for k in ("numpy draw", "random draw", "torch draw"):
        assert forked[0][k] != forked[1][k], k


def test_a_child_leaves_nothing_for_the_next_one_outside_its_own_folders(tmp_path):
    """A later child (another tenant's) sees the same read-only system view and its own folders:
    an earlier one can write nowhere it would look (the shared temporary folders, the zygote's
    folder on sys.path, its own working folder, which the caller removes)."""
    import tempfile

    from jobs.sandbox import zygote_for

    z = zygote_for("sandbox_payloads", ENV)
    c = Child("sandbox_payloads:leave", ENV)
    paths = ["/tmp/clcalib-left", "/dev/shm/clcalib-left", os.path.join(z.cwd, "sandbox_payloads.py"),
             os.path.join(c.cwd, "left"), os.path.join(tempfile.gettempdir(), "clcalib-left")]
    r = c.run(Jail(tmp=str(tmp_path / "l")), {"paths": paths}, 60)
    assert all(v.startswith("refused") for v in r.values()), r
    assert not any(os.path.exists(p) for p in paths)


@pytest.mark.parametrize("kind", ["huge", "deep"])
def test_a_child_cannot_send_what_the_caller_cannot_read(tmp_path, kind):
    """A line past the size limit (never ended) or nested past the parser's depth fails the run
    as a protocol error at once: the caller neither buffers without bound nor waits for the end."""
    t = time.monotonic()
    with pytest.raises(ChildFailed) as e:
        Child("sandbox_payloads:forge", ENV).run(Jail(tmp=str(tmp_path / "p")), {"kind": kind}, 50, lambda ev: None)
    assert e.value.kind == "protocol" and time.monotonic() - t < 30, (e.value, time.monotonic() - t)


def test_a_zygote_that_dies_mid_request_fails_that_run_and_the_next_gets_a_new_one(tmp_path):
    """The zygote killed (the OOM killer, an operator) while a child is asked of it: that run
    fails as the sandbox being unavailable, at once, and the next run starts a new zygote."""
    import signal
    import threading

    from jobs.sandbox import zygote_for

    env = {**ENV, "CLCALIB_TEST_ZYGOTE": "dies"}  # a zygote of its own
    assert Child("sandbox_payloads:events", env).run(Jail(tmp=str(tmp_path / "a")), {"n": 0}, 300) == "done"
    z, before = zygote_for("sandbox_payloads", env), set(_zombies())
    os.kill(z.proc.pid, signal.SIGSTOP)  # the request waits in its socket
    c, errors = Child("sandbox_payloads:events", env), []
    t = threading.Thread(target=lambda: errors.append(pytest.raises(ChildFailed, c.wait_ready, 120).value))
    seq = z._seq
    t.start()
    deadline = time.monotonic() + 60
    while z._seq == seq and time.monotonic() < deadline:  # until the request is on its way
        time.sleep(0.01)
    time.sleep(0.2)
    os.kill(z.proc.pid, signal.SIGKILL)
    t.join(10)
    assert not t.is_alive() and errors and errors[0].kind == "sandbox", errors
    c.close()
    assert Child("sandbox_payloads:events", env).run(Jail(tmp=str(tmp_path / "b")), {"n": 1}, 300) == "done"
    assert zygote_for("sandbox_payloads", env) is not z and not set(_zombies()) - before


def test_a_dead_callers_zygote_and_child_are_not_left_zombies_in_the_process_above_it(tmp_path):
    """``clcalib serve`` (a subreaper: it has a zygote) runs the local worker, which has its own
    zygote and child. When the worker dies they come to serve and die with it: serve waits for
    them, rather than keeping a zombie per worker death (a crash-looping worker exhausts pids)."""
    from jobs.sandbox import zygote_for

    zygote_for("sandbox_payloads", ENV)  # this process is a subreaper, as serve is
    worker, child, zygote = _caller_with_a_running_child(tmp_path)
    worker.kill()
    worker.wait()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not {process_state(child), process_state(zygote)} <= {"", "Z"}:
            time.sleep(0.1)
        assert Child("sandbox_payloads:events", ENV).run(Jail(tmp=str(tmp_path / "e")), {"n": 0}, 60) == "done"
        assert process_state(zygote) == "" and process_state(child) == "", (process_state(zygote), process_state(child))
    finally:
        _state(child), _state(zygote)  # reaped here if they were not


def test_without_landlock_signal_scoping_a_child_still_signals_no_other_process(tmp_path):
    """Landlock scopes signals only from ABI 6 (Linux 6.12); on an older kernel (Ubuntu 24.04's
    6.8 has ABI 4) a child that keeps uid 0 (a root install under /root) could SIGKILL its API or
    worker, its zygote, another tenant's child, or the whole process group (another uid-65534
    child could kill every other tenant's): seccomp lets a child signal itself only."""
    import signal

    from jobs.sandbox import zygote_for

    sibling, t = _running_sibling(tmp_path)
    got = []
    old = signal.signal(signal.SIGURG, lambda *_: got.append(1))  # this process is in the children's group
    try:
        pids = {"zygote": zygote_for("sandbox_payloads_abi5", ENV).proc.pid, "caller": os.getpid(),
                "sibling": sibling.proc.pid}
        c = Child("sandbox_payloads_abi5:reach", ENV)
        r = c.run(Jail(tmp=str(tmp_path / "r")), {"pids": pids}, 60)
        assert "landlock ABI" in c.how and "ABI 7" not in c.how and "ABI 6" not in c.how, c.how  # as on 6.8
        group = Child("sandbox_payloads_abi5:signal_group", ENV).run(Jail(tmp=str(tmp_path / "g")), {}, 60)
    finally:
        signal.signal(signal.SIGURG, old)
        sibling.close()
        t.join(10)
    assert all(v.startswith("refused") for v in r.values()), r
    assert group["group"].startswith("refused") and group["all"].startswith("refused") and not got, (group, got)


def test_a_diverged_runs_nan_and_infinity_arrive_as_null(tmp_path):
    """A run whose loss became NaN (or a hostile child) must not put NaN into the job's stored
    progress and metrics: the API's answers are strict JSON and PostgreSQL's json refuses it, so
    the job's status would be a 500 for its tenant."""
    events = []
    r = Child("sandbox_payloads:non_finite", ENV).run(Jail(tmp=str(tmp_path / "t")), {}, 60, events.append)
    assert events == [{"stage": "reconstruct", "loss": None, "eta_s": None}], events
    assert r == {"loss": None, "top1": 12.5}, r


@pytest.mark.parametrize("module, survives", [("sandbox_payloads", False), ("sandbox_payloads_stops", True)])
def test_a_stop_signal_to_the_group_is_left_to_the_caller_only_where_the_module_says(module, survives, tmp_path):
    """SIGINT and SIGTERM to every process of a worker (Ctrl-C in its terminal, a service manager
    stopping it): the calibration's child must outlive them, its worker hands the job back and
    kills it; an upload check's child still dies of them with its API (a 503 to the client)."""
    import signal
    import threading

    import service.checks
    import worker.sandboxed

    assert worker.sandboxed.STOP_SIGNALS_TO_CALLER and not hasattr(service.checks, "STOP_SIGNALS_TO_CALLER")
    child = Child(f"{module}:linger", ENV)
    out: dict = {}

    def run():
        try:
            out["result"] = child.run(Jail(tmp=str(tmp_path / "t")), {"seconds": 2.0}, 60)
        except ChildFailed as e:
            out["failed"] = e.message

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 60
    while not (child.ready and child.how) and time.monotonic() < deadline:  # confined, running the function
        time.sleep(0.02)
    for sig in (signal.SIGINT, signal.SIGTERM):
        os.kill(child.proc.pid, sig)
    t.join(60)
    assert out == ({"result": "woke"} if survives else {"failed": "the process ended without an answer (killed by SIGTERM)"}), out

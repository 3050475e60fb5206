"""A full data disk (issue 14 class 7), on a real small filesystem (tmpfs mounted for the test):
uploads that would eat the reserve are a 507 with Retry-After, a disk that fills up under an
upload is a 507 (not a 400), nothing of a refused upload stays on disk, and /readyz and
/metrics report the free space."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from svc_helpers import Stack

MiB = 1 << 20


@pytest.fixture
def small_disk(tmp_path):
    """A fresh tmpfs of the given size as a stack's data folder; unmounted afterwards."""
    mounted, stacks = [], []

    def make(size_mib: int, **env) -> Stack:
        st = Stack(tmp_path / f"stack{len(stacks)}", **env)
        data = st.dir / "data"
        data.mkdir(parents=True)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(data)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip()}")
        mounted.append(data)
        stacks.append(st)
        return st

    yield make
    for st in stacks:
        st.close()
    for d in mounted:
        subprocess.run(["umount", str(d)], check=False)


def _upload(stack, size: int, chunked: bool):
    boundary = "disk"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"; filename=\"m.pt\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()

    def body():
        yield head
        for _ in range(size // MiB):
            yield b"\1" * MiB
        yield f"\r\n--{boundary}--\r\n".encode()

    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    with stack.client() as c:
        return c.post("/v1/jobs", content=body() if chunked else b"".join(body()), headers=headers, timeout=60)


def _no_job_files(stack) -> bool:
    jobs = stack.dir / "data" / "jobs"
    return not jobs.exists() or not any(jobs.iterdir())


def test_uploads_keep_the_reserve_and_a_full_disk_is_507(small_disk):
    st = small_disk(48, CLCALIB_MIN_FREE_BYTES=8 * MiB).start_api()
    free = shutil.disk_usage(st.dir / "data").free
    # declared too large for what is free minus the reserve: refused before a byte is stored
    r = _upload(st, (free // MiB - 4) * MiB, chunked=False)
    assert r.status_code == 507 and r.json()["code"] == "insufficient_storage", r.text
    assert r.headers["Retry-After"] and "MiB free" in r.json()["detail"]
    # streamed without a length: stopped once the reserve is reached, and its partial file removed
    r = _upload(st, 44 * MiB, chunked=True)
    assert r.status_code == 507, r.text
    assert _no_job_files(st)
    with st.client() as c:
        assert c.get("/readyz").status_code == 200
        assert "clcalib_data_free_bytes" in c.get("/metrics").text

    # the disk fills up from elsewhere: not ready, and say why
    ballast = st.dir / "data" / "ballast"
    ballast.write_bytes(b"\0" * (shutil.disk_usage(st.dir / "data").free - 4 * MiB))
    with st.client() as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["checks"]["disk"].startswith("low:"), r.text
    ballast.unlink()
    with st.client() as c:
        assert c.get("/readyz").status_code == 200

    # no reserve at all: the write itself fails (ENOSPC) and that too is a 507
    st0 = small_disk(24, CLCALIB_MIN_FREE_BYTES=0).start_api()
    r = _upload(st0, 40 * MiB, chunked=True)
    assert r.status_code == 507 and r.json()["code"] == "insufficient_storage", r.text
    assert _no_job_files(st0)


def test_a_stalled_upload_body_is_closed_with_408(stack_factory):
    """A client that sends the headers and part of the body, then nothing: answered 408 after
    CLCALIB_BODY_TIMEOUT_S, its partial files removed; the API keeps serving others meanwhile."""
    import socket
    import time

    st = stack_factory(CLCALIB_BODY_TIMEOUT_S=2).start_api()
    body_head = (b"--b\r\nContent-Disposition: form-data; name=\"model\"; filename=\"m.pt\"\r\n\r\n" + b"\0" * 1000)
    with socket.create_connection(("127.0.0.1", st.port), timeout=20) as s:
        s.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer key-a\r\n"
                  b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 1000000\r\n\r\n" + body_head)
        t0 = time.monotonic()
        with st.client() as c:
            assert c.get("/healthz").status_code == 200  # not blocked by the stalled upload
        reply = s.recv(4096)
        waited = time.monotonic() - t0
        while chunk := s.recv(4096):  # the body may come in a later segment; the server closes after it
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b"body_timeout" in reply and 1.5 < waited < 10
    assert _no_job_files(st)

"""A full data disk (issue 14 class 7), on a real small filesystem (tmpfs mounted for the test):
uploads that would eat the reserve are a 507 with Retry-After, a disk that fills up under an
upload is a 507 (not a 400), nothing of a refused upload stays on disk, and /readyz and
/metrics report the free space. Cancel and delete work on a full disk (issue 24)."""

from __future__ import annotations

import json
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


def _fill(data) -> None:
    """Write a ballast file until the disk is full (ENOSPC)."""
    with open(data / "ballast", "wb") as f:
        try:
            while True:
                f.write(b"\0" * (64 << 10))
                f.flush()
        except OSError:
            pass


def test_cancel_and_delete_work_on_a_full_disk(small_disk):
    """Issue 24 class 6: with no disk reserve and a full disk, cancel and delete answered 500: the
    SQLite store's commit (its write-ahead log grows) failed with 'database or disk is full'. The
    store keeps 4 MiB of headroom beside the database and frees it for these writes: cancel 200,
    delete 204. With the headroom gone too, cancel is a 507 naming the full disk, and delete still
    works (the job's files go first)."""
    import io

    import numpy as np
    from svc_fmnist import MOBILENET, TINY

    st = small_disk(48, CLCALIB_MIN_FREE_BYTES=0).start_api()
    data = st.dir / "data"
    b = io.BytesIO()
    np.save(b, np.zeros((4, 3, 28, 28), np.float32))
    files = {"model": ("m.safetensors", MOBILENET.read_bytes()), "calibration": ("c.npy", b.getvalue())}
    form = {"arch": "mobilenet_v2", "num_classes": "10", "config": json.dumps({**TINY, "calib_size": 4})}
    with st.client() as c:
        ids = []
        for _ in range(3):
            r = c.post("/v1/jobs", files=files, data=form)
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
        assert (data / "jobs.db-headroom").stat().st_size == 4 * MiB
        _fill(data)
        assert shutil.disk_usage(data).free < 64 << 10
        r = c.post(f"/v1/jobs/{ids[0]}/cancel")
        assert r.status_code == 200 and r.json()["state"] == "canceled", r.text
        assert not (data / "jobs" / ids[0]).exists()
        assert c.delete(f"/v1/jobs/{ids[1]}").status_code == 204
        assert c.get(f"/v1/jobs/{ids[1]}").status_code == 404
        assert c.get(f"/v1/jobs/{ids[0]}").json()["state"] == "canceled"

        # the headroom used up as well (and the space freed above filled again): cancel is a 507
        (data / "jobs.db-headroom").unlink(missing_ok=True)
        _fill(data)
        r = c.post(f"/v1/jobs/{ids[2]}/cancel")
        assert r.status_code == 507 and r.json()["code"] == "insufficient_storage", r.text
        assert "disk is full" in r.json()["detail"] and r.headers["Retry-After"]
        assert c.delete(f"/v1/jobs/{ids[2]}").status_code == 204  # its files freed the room for it
        assert c.get(f"/v1/jobs/{ids[2]}").status_code == 404
    assert "Traceback" not in st.api.tail(200), st.api.tail(200)

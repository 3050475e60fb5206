"""Slow and numerous clients (issue 14 class 6), on `clcalib serve` over real sockets: a
connection that trickles its headers is closed after CLCALIB_HEADER_TIMEOUT_S while other
clients are served; connections beyond CLCALIB_MAX_CONNECTIONS get a 503 with the API's error
body before anything is read; a wrong key on an upload is answered 401 without the body; a form
body (sign-in, sign-out) that does not arrive whole within CLCALIB_BODY_TIMEOUT_S is answered
408 and closed, one larger than CLCALIB_MAX_FORM_BYTES 413, while a slow but steady upload is
read to its end."""

from __future__ import annotations

import json
import os
import select
import socket
import sys
import time

import httpx
import pytest
from svc_fmnist import TINY
from svc_helpers import ROOT, Proc, free_port, peak_rss, wait_until

HEADER_TIMEOUT = 2.0
MAX_CONNECTIONS = 4
BODY_TIMEOUT = 3.0
FORM_CAP = 4096


@pytest.fixture
def api(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLCALIB_")}
    env.update(CLCALIB_DATA_DIR=str(tmp_path / "data"), CLCALIB_API_KEYS='{"key-a": "tenant-a"}',
               CLCALIB_HEADER_TIMEOUT_S=str(HEADER_TIMEOUT), CLCALIB_MAX_CONNECTIONS=str(MAX_CONNECTIONS),
               CLCALIB_BODY_TIMEOUT_S=str(BODY_TIMEOUT), CLCALIB_MAX_FORM_BYTES=str(FORM_CAP),
               PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    p = Proc([sys.executable, "-m", "clcalib.cli", "serve", "--no-worker", "--port", str(port)], env,
             tmp_path / "api.log")
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: httpx.get(url + "/healthz", timeout=2).status_code == 200, 60, f"the API\n{p.tail()}")
    yield port, url, p
    p.stop()


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.settimeout(10)
    return s


def _closed_after(s: socket.socket, t0: float) -> float:
    """Seconds from t0 until the server closed the connection (recv returns b'')."""
    while s.recv(4096):
        pass
    return time.monotonic() - t0


def test_trickled_headers_are_cut_off_while_others_are_served(api, fmnist_zips, reference_model):
    port, url, proc = api
    s = _connect(port)
    t0 = time.monotonic()
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    closed = None
    for _ in range(40):  # one header byte every 0.25 s: never a complete request
        try:
            s.sendall(b"X")
        except OSError:
            closed = time.monotonic() - t0
            break
        assert httpx.get(url + "/healthz", timeout=5).status_code == 200  # others are served
        time.sleep(0.25)
    if closed is None:
        closed = _closed_after(s, t0)
    assert HEADER_TIMEOUT - 0.5 < closed < HEADER_TIMEOUT + 3, closed
    # a silent connection: closed too
    s = _connect(port)
    assert HEADER_TIMEOUT - 0.5 < _closed_after(s, time.monotonic()) < HEADER_TIMEOUT + 3
    # an innocent tenant's upload is accepted while a slow connection is open
    slow2 = _connect(port)
    slow2.sendall(b"POST /v1/jobs HTTP/1.1\r\nHo")
    with httpx.Client(base_url=url, headers={"Authorization": "Bearer key-a"}, timeout=120) as c:
        r = c.post("/v1/jobs", files={"model": ("m.safetensors", reference_model.read_bytes()),
                                      "calibration": ("c.zip", fmnist_zips["calib"].read_bytes())},
                   data={"arch": "resnet18", "num_classes": "10", "config": json.dumps(TINY)})
    assert r.status_code == 202, r.text
    slow2.close()
    assert peak_rss(proc.pid) < 400 << 20  # the API process (serve), slow connections and all


def test_connections_beyond_the_limit_get_a_503_body_and_recover(api):
    port, url, _ = api
    idle = [_connect(port) for _ in range(MAX_CONNECTIONS)]
    time.sleep(0.2)
    extra = _connect(port)
    extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    reply = b""
    while chunk := extra.recv(4096):
        reply += chunk
    head, body = reply.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 503") and b"retry-after" in head.lower(), head
    assert json.loads(body)["code"] == "too_many_connections"
    for s in idle:
        s.close()
    wait_until(lambda: httpx.get(url + "/healthz", timeout=5).status_code == 200, 10, "the API to serve again")


def test_a_wrong_key_is_refused_before_the_body(api):
    port, _, _ = api
    s = _connect(port)
    t0 = time.monotonic()
    # announces 1 GB of body and sends none of it
    s.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\n"
              b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 1000000000\r\n\r\n")
    reply = s.recv(4096)
    assert reply.startswith(b"HTTP/1.1 401"), reply[:200]
    assert time.monotonic() - t0 < 2
    s.close()


def _answers(socks: list[socket.socket], t0: float, limit: float, trickle: socket.socket | None = None):
    """Each socket's reply and the seconds from t0 until the server closed it (None: still open
    ``limit`` seconds after t0). ``trickle``: fed one more byte every 0.5 s until it is answered."""
    replies = {s: b"" for s in socks}
    closed: dict[socket.socket, float] = {}
    next_byte = time.monotonic()
    while len(closed) < len(socks) and time.monotonic() - t0 < limit:
        ready, _, _ = select.select([s for s in socks if s not in closed], [], [], 0.05)
        for s in ready:
            chunk = s.recv(4096)
            replies[s] += chunk
            if not chunk:
                closed[s] = time.monotonic() - t0
        if trickle is not None and not replies[trickle] and trickle not in closed and time.monotonic() >= next_byte:
            trickle.sendall(b"a")  # never silent for long: only a deadline on the whole body ends it
            next_byte += 0.5
    return [(replies[s], closed.get(s)) for s in socks]


def _form_head(path: bytes, length: int) -> bytes:
    return (b"POST " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded"
            b"\r\nContent-Length: " + str(length).encode() + b"\r\n\r\n")


def test_stalled_form_bodies_are_closed_but_a_slow_upload_is_not(api):
    """No key needed: MAX_CONNECTIONS connections send complete POST /login and /logout headers
    announcing 100 bytes of body, then 4 of them and nothing more (one adds a byte every 0.5 s).
    While they hold every slot another client gets the 503; each is answered 408 body_timeout and
    closed CLCALIB_BODY_TIMEOUT_S after its headers, and the slots serve again. A job upload
    larger than the form cap, sent steadily for longer than CLCALIB_BODY_TIMEOUT_S, is read to its
    end (its config is then refused, 422: the body was not)."""
    port, url, _ = api
    held = [_connect(port) for _ in range(MAX_CONNECTIONS)]
    for i, s in enumerate(held):
        s.sendall(_form_head(b"/login" if i % 2 == 0 else b"/logout", 100) + (b"key=" if i % 2 == 0 else b"csrf"))
    t0 = time.monotonic()
    time.sleep(0.3)
    extra = _connect(port)
    extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    [(refused, _)] = _answers([extra], time.monotonic(), 10)
    assert refused.startswith(b"HTTP/1.1 503") and b"too_many_connections" in refused, refused[:200]
    for reply, closed in _answers(held, t0, BODY_TIMEOUT + 8, trickle=held[0]):
        assert reply.startswith(b"HTTP/1.1 408"), (closed, reply[:300])
        assert b"body_timeout" in reply and b"CLCALIB_BODY_TIMEOUT_S" in reply, reply
        assert closed is not None and BODY_TIMEOUT - 0.5 < closed < BODY_TIMEOUT + 3, closed
    wait_until(lambda: httpx.get(url + "/healthz", timeout=5).status_code == 200, 10, "the API to serve again")

    # the upload route keeps its own rule: no total deadline, only a minimum rate (1024 bytes/s)
    part = b"\0" * (16 << 10)
    head = b'--b\r\nContent-Disposition: form-data; name="model"; filename="m.safetensors"\r\n\r\n'
    tail = b'\r\n--b\r\nContent-Disposition: form-data; name="config"\r\n\r\n[1]\r\n--b--\r\n'
    chunks = [head] + [part] * 24 + [tail]  # 384 KiB at 64 KiB/s: 6 s, twice the body timeout
    s = _connect(port)
    s.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer key-a\r\n"
              b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: "
              + str(sum(map(len, chunks))).encode() + b"\r\n\r\n")
    t0 = time.monotonic()
    for chunk in chunks:
        s.sendall(chunk)
        time.sleep(0.25)
    assert time.monotonic() - t0 > 2 * BODY_TIMEOUT * 0.9
    [(reply, _)] = _answers([s], time.monotonic(), 30)
    assert reply.startswith(b"HTTP/1.1 422") and b"bad_config" in reply, reply[:300]
    s.close()


def test_a_form_body_over_the_cap_is_413(api):
    """A sign-in announcing 1 GB is answered 413 naming CLCALIB_MAX_FORM_BYTES before any of it
    is read, and closed; a chunked one (no Content-Length) as soon as it passes the cap."""
    port, url, _ = api
    s = _connect(port)
    s.sendall(_form_head(b"/login", 1_000_000_000))
    [(reply, closed)] = _answers([s], time.monotonic(), BODY_TIMEOUT + 5)
    assert reply.startswith(b"HTTP/1.1 413") and b"CLCALIB_MAX_FORM_BYTES" in reply, reply[:300]
    assert closed is not None and closed < BODY_TIMEOUT - 1, closed  # at once, not at the body deadline
    r = httpx.post(url + "/logout", content=iter([b"csrf_token=", b"a" * FORM_CAP]), timeout=10,
                   headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 413 and r.json()["code"] == "body_too_large", r.text
    assert httpx.get(url + "/healthz", timeout=5).status_code == 200

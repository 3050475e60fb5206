"""Slow and numerous clients (issue 14 class 6), on `clcalib serve` over real sockets: a
connection that trickles its headers is closed after CLCALIB_HEADER_TIMEOUT_S while other
clients are served; connections beyond CLCALIB_MAX_CONNECTIONS get a 503 with the API's error
body before anything is read; a wrong key on an upload is answered 401 without the body."""

from __future__ import annotations

import json
import os
import socket
import sys
import time

import httpx
import pytest
from svc_fmnist import TINY
from svc_helpers import ROOT, Proc, free_port, peak_rss, wait_until

HEADER_TIMEOUT = 2.0
MAX_CONNECTIONS = 4


@pytest.fixture
def api(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLCALIB_")}
    env.update(CLCALIB_DATA_DIR=str(tmp_path / "data"), CLCALIB_API_KEYS='{"key-a": "tenant-a"}',
               CLCALIB_HEADER_TIMEOUT_S=str(HEADER_TIMEOUT), CLCALIB_MAX_CONNECTIONS=str(MAX_CONNECTIONS),
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

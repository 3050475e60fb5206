"""One expensive upload must not stall or break another tenant's submit (issue 14 class 2): a
.tar.gz whose sampled images lie in reverse name order is re-decompressed from the start for
every sample and runs into the check timeout; a valid upload sent meanwhile by another tenant is
checked by another warm child and accepted, and the validator is healthy afterwards."""

from __future__ import annotations

import io
import json
import tarfile
import threading
import time

import numpy as np
from PIL import Image
from svc_fmnist import TINY
from svc_helpers import Stack, children, peak_rss


def _slow_tar(path, n: int = 1500) -> None:
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w:gz", compresslevel=1) as t:
        for i in reversed(range(n)):  # archive order is the reverse of name order
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(buf, format="PNG")
            info = tarfile.TarInfo(f"img/{i:05d}.png")
            info.size = buf.tell()
            buf.seek(0)
            t.addfile(info, buf)


def _submit(stack, key, model, calib, out, label):
    with stack.client(key, timeout=120) as c:
        t0 = time.monotonic()
        r = c.post("/v1/jobs", files={"model": ("m.safetensors", model.read_bytes()),
                                      "calibration": (calib.name, calib.read_bytes())},
                   data={"arch": "resnet18", "num_classes": "10", "config": json.dumps(TINY)})
        out[label] = (r, time.monotonic() - t0)


def test_a_check_timeout_costs_only_the_upload_that_caused_it(tmp_path, fmnist_zips, reference_model):
    slow = tmp_path / "slow.tar.gz"
    _slow_tar(slow)
    st = Stack(tmp_path / "stack", CLCALIB_VALIDATE_TIMEOUT_S=6, CLCALIB_VALIDATE_SAMPLE=512)
    try:
        st.start_api()
        out: dict = {}
        a = threading.Thread(target=_submit, args=(st, "key-a", reference_model, slow, out, "slow"))
        a.start()
        time.sleep(1.5)  # tenant a's archive is in its check now
        _submit(st, "key-b", reference_model, fmnist_zips["calib"], out, "valid")
        a.join(120)
        slow_r, slow_s = out["slow"]
        valid_r, valid_s = out["valid"]
        assert slow_r.status_code == 422 and slow_r.json()["code"] == "check_timeout", slow_r.text
        assert valid_r.status_code == 202, valid_r.text
        assert valid_s < slow_s  # not queued behind the slow check
        # the validator survived: the next upload is checked and accepted
        _submit(st, "key-a", reference_model, fmnist_zips["calib"], out, "after")
        assert out["after"][0].status_code == 202, out["after"][0].text
        # memory stayed bounded: the API, and every validator child (the killed one is gone)
        assert peak_rss(st.api.pid) < 400 << 20
        assert all(peak_rss(p) < 1 << 30 for p in children(st.api.pid))
    finally:
        st.close()


def test_one_tenants_slow_uploads_cannot_hold_every_check(tmp_path, fmnist_zips, reference_model):
    """Tenant a sends two slow archives at once: with CLCALIB_VALIDATE_SLOTS_PER_TENANT=1 the
    second waits for the first, so one of the two check slots stays free for tenant b, whose
    valid submit is accepted while a's checks still run (before issue 24: 106 s instead of 0.6)."""
    slow = tmp_path / "slow.tar.gz"
    _slow_tar(slow)
    st = Stack(tmp_path / "stack", CLCALIB_VALIDATE_TIMEOUT_S=8, CLCALIB_VALIDATE_SAMPLE=512,
               CLCALIB_VALIDATE_WORKERS=2, CLCALIB_VALIDATE_SLOTS_PER_TENANT=1)
    try:
        st.start_api()
        out: dict = {}
        slows = [threading.Thread(target=_submit, args=(st, "key-a", reference_model, slow, out, f"slow{i}"))
                 for i in range(2)]
        for t in slows:
            t.start()
        time.sleep(1.5)
        _submit(st, "key-b", reference_model, fmnist_zips["calib"], out, "valid")
        for t in slows:
            t.join(120)
        valid_r, valid_s = out["valid"]
        assert valid_r.status_code == 202, valid_r.text
        assert all(out[f"slow{i}"][0].json()["code"] == "check_timeout" for i in range(2)), out
        # b did not wait behind a's checks: accepted before a's second check (queued behind its first) ended
        assert valid_s < max(out[f"slow{i}"][1] for i in range(2)) - 4, (valid_s, out)
    finally:
        st.close()


def test_a_check_ended_by_the_server_stopping_is_a_503_not_the_uploads_fault():
    """Found by bench/soak.py: the API restarted (SIGTERM to its process group) while checking an
    upload, and the client was told its file crashed the decoder (422)."""
    import asyncio

    import pytest

    from jobs.sandbox import ChildFailed
    from jobs.settings import Settings
    from service.errors import ApiError
    from service.validation import Validator

    class Dies:
        def __init__(self, how: str):
            self.how = how

        def run(self, *a, **k):
            raise ChildFailed("died", f"the process ended without an answer ({self.how})")

    v = Validator(Settings())
    with pytest.raises(ApiError) as e:
        asyncio.run(v._run(Dies("killed by SIGTERM"), None, {}, 1.0))
    assert (e.value.status, e.value.body()["code"]) == (503, "shutting_down")
    with pytest.raises(ApiError) as e:
        asyncio.run(v._run(Dies("killed by SIGSEGV"), None, {}, 1.0))
    assert (e.value.status, e.value.body()["code"]) == (422, "check_crashed")

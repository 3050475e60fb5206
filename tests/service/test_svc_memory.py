"""Memory follows the operator's budget, not the config (issue 14 class 3).

A 16-image zip of tiny PNGs with ``preprocess.resize = 4096`` used to make the validator
allocate GBs (every sampled image upscaled to 4096 px, all kept). Now each image's preprocessed
size is checked from its header against CLCALIB_MAX_SAMPLE_PIXELS, the check decodes one image
at a time, and the set the worker will stack is held to CLCALIB_MAX_SET_BYTES at upload; the
worker reads with the same limits. Peak memory is the kernel's high-water mark (VmHWM).
"""

from __future__ import annotations

import io
import json
import threading
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image
from svc_fmnist import TINY
from svc_helpers import Stack, children, peak_rss

MiB = 1 << 20
# a validator child with torch imported sits at ~400 MiB; the attack used to take it to ~3.6 GB
VALIDATOR_PEAK_BOUND = 1024 * MiB
API_PEAK_BOUND = 400 * MiB


def _tiny_pngs(path: Path, n: int = 16) -> Path:
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w") as z:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, format="PNG")
            z.writestr(f"img/{i:02d}.png", buf.getvalue())
    return path


def _post(stack, key, model, calib, config, out, label):
    with stack.client(key, timeout=120) as c:
        out[label] = c.post("/v1/jobs", files={"model": ("m.safetensors", model.read_bytes()),
                                               "calibration": (calib.name, calib.read_bytes())},
                            data={"arch": "resnet18", "num_classes": "10", "config": json.dumps(config)})


def test_upscaling_config_is_refused_from_headers_with_bounded_memory(tmp_path, fmnist_zips, reference_model):
    tiny = _tiny_pngs(tmp_path / "tiny.zip")
    assert tiny.stat().st_size < 16 << 10
    blowup = {**TINY, "preprocess": {**TINY["preprocess"], "resize": 4096, "crop": None}}
    st = Stack(tmp_path / "stack", CLCALIB_VALIDATE_SAMPLE=64)
    try:
        st.start_api()
        out: dict = {}
        # tenant a's hostile upload and tenant b's valid one at the same time
        a = threading.Thread(target=_post, args=(st, "key-a", reference_model, tiny, blowup, out, "a"))
        a.start()
        _post(st, "key-b", reference_model, fmnist_zips["calib"], TINY, out, "b")
        a.join(120)
        r = out["a"]
        assert r.status_code == 422, r.text
        body = r.json()
        assert body["field"] == "calibration" and body["code"] == "bad_data", body
        assert "4096x4096" in body["detail"] and "preprocess.resize" in body["detail"], body
        assert out["b"].status_code == 202, out["b"].text
        api_pid = st.api.pid
        kids = children(api_pid)
        assert kids, "no validator children found"
        peaks = {pid: peak_rss(pid) for pid in kids}
        assert max(peaks.values()) < VALIDATOR_PEAK_BOUND, {p: v // MiB for p, v in peaks.items()}
        assert peak_rss(api_pid) < API_PEAK_BOUND, peak_rss(api_pid) // MiB
    finally:
        st.close()


def test_the_set_budget_is_checked_at_upload_and_reaches_the_worker(tmp_path, fmnist_zips, reference_model):
    calib = fmnist_zips["calib"]  # 256 images of 3x28x28 float32: 2.3 MiB
    st = Stack(tmp_path / "stack", CLCALIB_MAX_SET_BYTES=MiB)
    try:
        st.start_api()
        r = st.submit(reference_model, calib, TINY)
        assert r.status_code == 422, r.text
        assert r.json()["field"] == "calibration" and "more than the 1 MiB allowed" in r.json()["detail"], r.text
        # the API accepts (its budget is ample); a worker whose operator set a smaller budget
        # refuses the set with the same rule instead of reading it with the library defaults
        st.stop_api()
        st.env["CLCALIB_MAX_SET_BYTES"] = str(64 * MiB)
        st.start_api()
        r = st.submit(reference_model, calib, TINY)
        assert r.status_code == 202, r.text
        st.env["CLCALIB_MAX_SET_BYTES"] = str(MiB)
        st.start_worker()
        job = st.wait_state(r.json()["id"], timeout=180)
        assert job["state"] == "failed" and "more than the 1 MiB allowed" in job["error"], job
    finally:
        st.close()


def test_a_job_that_cannot_fit_the_workers_cap_is_refused_at_upload_with_the_figure(tmp_path, reference_model):
    """Four 28x28 PNGs resized to 1024 px: a few KiB uploaded, GiBs of activations in the worker.
    The upload check estimates the worker's peak (clcalib/memory_estimate.py) and refuses it."""
    tiny = _tiny_pngs(tmp_path / "four.zip", n=4)
    upscaled = {**TINY, "preprocess": {**TINY["preprocess"], "resize": 1024, "crop": None}}
    st = Stack(tmp_path / "stack", CLCALIB_WORKER_MEMORY_BYTES=2 << 30)
    try:
        st.start_api()
        r = st.submit(reference_model, tiny, upscaled)
        assert r.status_code == 422, r.text
        body = r.json()
        assert body["code"] == "too_much_memory" and body["field"] == "calibration", body
        assert "the worker's memory cap is 2.0 GiB (CLCALIB_WORKER_MEMORY_BYTES)" in body["detail"], body
        assert "GiB in the worker" in body["detail"] and "(3, 1024, 1024)" in body["detail"], body
        r = st.submit(reference_model, tiny, TINY)  # the same images at their size fit
        assert r.status_code == 202, r.text
        peaks = {pid: peak_rss(pid) for pid in children(st.api.pid)}
        assert max(peaks.values()) < 2048 * MiB, {p: v // MiB for p, v in peaks.items()}
    finally:
        st.close()


def test_a_job_over_the_workers_memory_cap_fails_in_one_line_and_the_worker_goes_on(tmp_path, fmnist_zips,
                                                                                   reference_model):
    """The API's estimate passes the job (its operator's cap is the default); the worker was
    started with a far smaller one: each job fails naming the cap, the worker takes the next."""
    st = Stack(tmp_path / "stack")
    try:
        st.start_api()
        ids = [st.submit(reference_model, fmnist_zips["calib"], TINY).json()["id"] for _ in range(2)]
        st.env["CLCALIB_WORKER_MEMORY_BYTES"] = str(64 * MiB)
        worker = st.start_worker()
        for job_id in ids:
            job = st.wait_state(job_id, timeout=180)
            assert job["state"] == "failed", job
            assert "CLCALIB_WORKER_MEMORY_BYTES" in job["error"] and "\n" not in job["error"], job["error"]
        assert worker.alive()
    finally:
        st.close()

"""The web page in a real browser (Debian's chromium, driven by Playwright) against the real
service with a real worker: sign in, submit a job from the form, watch it run and succeed on
the live page, read the report, download the checkpoint and load it, delete the job.

CLCALIB_SCREENSHOTS=folder keeps screenshots of the job list, a running job and the report."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest
from svc_fmnist import MOBILENET, PREPROCESS
from svc_helpers import Stack


def test_a_person_submits_watches_and_downloads(tmp_path, fmnist_zips):
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright  # a dev dependency
    chromium = shutil.which("chromium")
    assert chromium, "chromium is not installed (apt-get install -y chromium)"
    shots = Path(os.environ.get("CLCALIB_SCREENSHOTS", tmp_path / "shots"))
    shots.mkdir(parents=True, exist_ok=True)
    st = Stack(tmp_path / "stack")
    try:
        st.start_api()
        st.start_worker()
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("dialog", lambda d: d.accept())
            page.goto(st.url + "/")
            page.fill("input[name=key]", "not-a-key")
            page.click("button[type=submit]")
            assert "unknown API key" in page.content()
            page.fill("input[name=key]", "key-a")
            page.click("button[type=submit]")
            page.wait_for_selector("form#submit")
            assert "No jobs" in page.content() and "tenant-a" in page.content()
            # the page's architecture list came from the validator: the API process loaded no torch
            assert "libtorch" not in Path(f"/proc/{st.api.pid}/maps").read_text()

            form = page.locator("form#submit")
            form.locator("input[name=model]").set_input_files(str(MOBILENET))
            form.locator("select[name=arch]").select_option("mobilenet_v2")
            form.locator("input[name=calibration]").set_input_files(str(fmnist_zips["calib"]))
            form.locator("input[name=evaluation]").set_input_files(str(fmnist_zips["eval"]))
            form.locator("select[name=method]").select_option("brecq")
            for name, value in (("iters", "15"), ("calib_size", "64"), ("resize", ""), ("crop", ""),
                                ("mean", ",".join(map(str, PREPROCESS["mean"]))), ("std", ",".join(map(str, PREPROCESS["std"])))):
                form.locator(f"input[name={name}]").fill(value)
            # the size and accuracy fields reach the job's config and the server's checks: both at
            # once is refused in the API, a budget below the smallest model by the upload check
            status = page.locator("#submit-status")
            form.locator("input[name=weight_mb]").fill("0.01")
            form.locator("input[name=max_top1_drop]").fill("1")
            form.locator("button[type=submit]").click()
            page.wait_for_function("() => document.getElementById('submit-status').className === 'error'")
            assert "give a budget or a target, not both" in status.inner_text(), status.inner_text()
            form.locator("input[name=max_top1_drop]").fill("")
            # the calibration draw: a value the config refuses is a 422 naming the field
            page.evaluate("() => { document.getElementById('submit-status').className = ''; }")
            page.evaluate("() => { document.querySelector('input[name=calib_seed]').removeAttribute('min'); }")
            form.locator("input[name=calib_seed]").fill("-1")
            form.locator("button[type=submit]").click()
            page.wait_for_function("() => document.getElementById('submit-status').className === 'error'")
            assert "422" in status.inner_text() and "calib_seed" in status.inner_text(), status.inner_text()
            form.locator("input[name=calib_seed]").fill("3")
            page.evaluate("() => { document.getElementById('submit-status').className = ''; }")
            form.locator("button[type=submit]").click()
            page.wait_for_function("() => document.getElementById('submit-status').className === 'error'",
                                   timeout=120_000)
            assert "422" in status.inner_text() and "below the smallest model" in status.inner_text(), status.inner_text()
            form.locator("input[name=weight_mb]").fill("")
            form.locator("button[type=submit]").click()
            page.wait_for_url("**/jobs/*", timeout=120_000)
            job_id = page.url.rsplit("/", 1)[1]
            assert page.request.get(f"{st.url}/v1/jobs/{job_id}").json()["config"]["calib_seed"] == 3
            # wait_for_function takes functions, not expressions: the page's CSP has no 'unsafe-eval'
            page.wait_for_function("() => document.getElementById('state').textContent === 'running'", timeout=120_000)
            page.wait_for_function("() => document.getElementById('where').textContent.includes('unit')", timeout=60_000)
            page.screenshot(path=str(shots / "job_running.png"))
            page.wait_for_function("() => document.getElementById('state').textContent === 'succeeded'", timeout=300_000)
            page.wait_for_selector("#downloads a")
            page.wait_for_timeout(1500)  # the report frame loads
            page.screenshot(path=str(shots / "job_succeeded.png"), full_page=True)
            frame = page.frame_locator("iframe#report")
            assert "quantized top-1" in frame.locator("body").inner_text()
            # the report may be framed by this origin only (the job page above), the pages by no one
            head = page.request.get(f"{st.url}/v1/jobs/{job_id}/artifacts/report.html").headers
            assert head["x-frame-options"] == "SAMEORIGIN", head
            assert "frame-ancestors 'self'" in head["content-security-policy"] and "script-src" not in head["content-security-policy"]
            head = page.request.get(f"{st.url}/jobs/{job_id}").headers
            assert head["x-frame-options"] == "DENY" and "frame-ancestors 'none'" in head["content-security-policy"], head
            session = {c["name"]: c for c in page.context.cookies()}["clcalib_session"]
            assert session["value"] != "key-a" and session["httpOnly"] and session["sameSite"] == "Strict", session

            with page.expect_download() as dl:
                page.click("#downloads a:text-is('quantized.safetensors')")
            ckpt = tmp_path / "quantized.safetensors"
            dl.value.save_as(ckpt)
            from clcalib.export import load_quantized

            assert load_quantized(ckpt).header["arch"] == "mobilenet_v2"

            page.goto(st.url + "/")
            assert job_id[:8] in page.content() and "succeeded" in page.content()
            page.screenshot(path=str(shots / "jobs.png"), full_page=True)
            page.goto(f"{st.url}/jobs/{job_id}")
            page.click("#delete")
            page.wait_for_url(st.url + "/")
            assert job_id[:8] not in page.content()
            page.click("button:text('sign out')")  # the sign-out form carries the session's CSRF token
            page.wait_for_selector("input[name=key]")
            with httpx.Client(base_url=st.url, cookies={"clcalib_session": session["value"]}) as c:
                assert c.get("/v1/jobs").status_code == 401  # the signed-out session is gone on the server
            browser.close()
    finally:
        st.close()

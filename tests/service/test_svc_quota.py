"""Per-tenant limits (issue 14 class 5, in part): a tenant at its limit of queued + running jobs
gets a 429 with Retry-After while another tenant is served; an upload that would pass the
tenant's stored bytes is a 429; a canceled queued job's uploads are deleted at once and stop
counting against its tenant. API only (no worker: jobs stay queued)."""

from __future__ import annotations

import json

from svc_fmnist import TINY
from svc_helpers import Stack


def _submit(st, key, model, calib):
    with st.client(key, timeout=120) as c:
        return c.post("/v1/jobs", files={"model": ("m.safetensors", model.read_bytes()),
                                         "calibration": (calib.name, calib.read_bytes())},
                      data={"arch": "resnet18", "num_classes": "10", "config": json.dumps(TINY)})


def test_tenant_limits_and_a_canceled_job_frees_its_uploads(tmp_path, fmnist_zips, reference_model):
    size = reference_model.stat().st_size + fmnist_zips["calib"].stat().st_size
    st = Stack(tmp_path / "jobs", CLCALIB_MAX_ACTIVE_JOBS=2)
    try:
        st.start_api()
        ids = [_submit(st, "key-a", reference_model, fmnist_zips["calib"]).json()["id"] for _ in range(2)]
        r = _submit(st, "key-a", reference_model, fmnist_zips["calib"])
        assert r.status_code == 429 and r.json()["code"] == "too_many_jobs" and r.headers["Retry-After"], r.text
        assert _submit(st, "key-b", reference_model, fmnist_zips["calib"]).status_code == 202  # the other tenant
        with st.client("key-a") as c:
            assert c.post(f"/v1/jobs/{ids[0]}/cancel").status_code == 200
        assert not (st.dir / "data" / "jobs" / ids[0]).exists()  # its uploads are gone at once
        assert (st.dir / "data" / "jobs" / ids[1]).exists()
        assert _submit(st, "key-a", reference_model, fmnist_zips["calib"]).status_code == 202  # a slot is free
    finally:
        st.close()

    st = Stack(tmp_path / "bytes", CLCALIB_MAX_TENANT_BYTES=int(size * 1.5))
    try:
        st.start_api()
        first = _submit(st, "key-a", reference_model, fmnist_zips["calib"])
        assert first.status_code == 202, first.text
        r = _submit(st, "key-a", reference_model, fmnist_zips["calib"])
        assert r.status_code == 429 and r.json()["code"] == "storage_quota", r.text
        with st.client("key-a") as c:  # canceling the first frees its bytes
            assert c.post(f"/v1/jobs/{first.json()['id']}/cancel").status_code == 200
        assert _submit(st, "key-a", reference_model, fmnist_zips["calib"]).status_code == 202
    finally:
        st.close()

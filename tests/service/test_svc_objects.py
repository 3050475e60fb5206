"""The object store behind the service (jobs/objects.py), on a real S3 API (moto's server on
loopback; IAM signatures checked for the credential faults) and on the data folder: keys stay inside their job, uploads are
atomic and hashed, reads stream in bounded chunks, and each fault raises a message naming it."""

from __future__ import annotations

import hashlib
import os
import time

import pytest

from jobs.objects import (
    CHUNK,
    LocalObjects,
    ObjectMissing,
    S3Objects,
    StoreMisconfigured,
    StoreUnavailable,
    artifact_key,
    input_key,
    job_prefix,
    resume_key,
    retrying,
)

JOB = "0123456789abcdef0123456789abcdef"


def creds(monkeypatch, key: str, secret: str) -> None:
    """boto3 reads them from the environment, as the service does."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)


def test_keys_never_leave_the_job_prefix(tmp_path):
    assert input_key(JOB, "inputs/model.safetensors") == f"jobs/{JOB}/inputs/model.safetensors"
    assert artifact_key(JOB, "report.json") == f"jobs/{JOB}/out/report.json"
    assert resume_key(JOB).startswith(job_prefix(JOB))
    for bad in ("../x", "..", "", ".hidden", "a/b", "a\\b", "x/../../y", "report.json\x00", "é.json", "a" * 200):
        with pytest.raises(ValueError):
            artifact_key(JOB, bad)
    for bad in ("inputs/../../../etc/passwd", "out/model.pt", "inputs/", "inputs/a/b", "/inputs/x"):
        with pytest.raises(ValueError):
            input_key(JOB, bad)
    for bad in ("../other", "a/b", "", "x" * 65, "ab cd"):
        with pytest.raises(ValueError):
            job_prefix(bad)
    with pytest.raises(ValueError):
        LocalObjects(tmp_path).path("jobs/../../etc/passwd")


def test_both_stores_hash_stream_and_delete(tmp_path, monkeypatch, s3_server):
    s3 = s3_server()
    creds(monkeypatch, s3.key, s3.secret)
    stores = [LocalObjects(tmp_path / "data"), S3Objects(s3.bucket, s3.url)]
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(3 * CHUNK + 123))
    want = hashlib.sha256(big.read_bytes()).hexdigest()
    for st in stores:
        st.check()
        d = st.put_file(big, artifact_key(JOB, "quantized.safetensors"))
        assert (d.sha256, d.size) == (want, big.stat().st_size), st.kind
        size, chunks = st.open(artifact_key(JOB, "quantized.safetensors"))
        parts = list(chunks)
        assert size == d.size and max(map(len, parts)) <= CHUNK, st.kind  # bounded: never the whole file
        assert hashlib.sha256(b"".join(parts)).hexdigest() == want
        st.get_file(artifact_key(JOB, "quantized.safetensors"), tmp_path / st.kind / "copy")
        assert (tmp_path / st.kind / "copy").read_bytes() == big.read_bytes()
        assert JOB in st.job_ids() and st.size(artifact_key(JOB, "report.json")) is None
        with pytest.raises(ObjectMissing):
            st.open(artifact_key(JOB, "report.json"))
        st.delete_job(JOB)
        assert not st.exists(artifact_key(JOB, "quantized.safetensors")) and JOB not in st.job_ids(), st.kind
    assert s3.keys() == []


def test_store_faults_name_the_problem(tmp_path, monkeypatch, s3_server):
    s3 = s3_server(auth=True)
    f = tmp_path / "f"
    f.write_bytes(b"x")
    creds(monkeypatch, s3.key, "not-the-secret")
    with pytest.raises(StoreMisconfigured, match=r"refused the service's credentials \(SignatureDoesNotMatch\)"):
        S3Objects(s3.bucket, s3.url).check()
    with pytest.raises(StoreMisconfigured, match="credentials"):  # an upload as well as the check
        S3Objects(s3.bucket, s3.url).put_file(f, artifact_key(JOB, "report.json"))
    creds(monkeypatch, "AKIANOSUCHKEY0000000", s3.secret)
    with pytest.raises(StoreMisconfigured, match=r"InvalidAccessKeyId"):
        S3Objects(s3.bucket, s3.url).check()
    creds(monkeypatch, s3.key, s3.secret)
    with pytest.raises(StoreMisconfigured, match=r"bucket 'no-such-bucket' does not exist"):
        S3Objects("no-such-bucket", s3.url).check()
    st = S3Objects(s3.bucket, s3.url, timeout_s=1)
    st.check()
    s3.kill()
    with pytest.raises(StoreUnavailable, match="cannot be reached"):
        st.check()
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable, match=r"uploading report.json: .*cannot be reached.*\(tried for 2s\)"):
        retrying(lambda: st.put_file(f, artifact_key(JOB, "report.json")), 2.0, "uploading report.json")
    assert 1.0 < time.monotonic() - t0 < 30


def test_workspace_publishes_only_plain_named_files_matching_the_report(tmp_path):
    """What a sandboxed run leaves in its scratch folder is untrusted: a link planted as the
    resume state is not followed (this process may read what the run may not), a made-up artifact
    name is not uploaded, and a checkpoint that differs from its report's hash fails the job."""
    from worker.workspace import ArtifactMismatch, Workspace

    objects = LocalObjects(tmp_path / "store")
    ws = Workspace(tmp_path / "scratch", objects, JOB, retry_s=1)
    ws.fetch({})
    secret = tmp_path / "secret"
    secret.write_text("the worker's credentials")
    ws.resume_file.symlink_to(secret)
    ws.sync_resume()
    assert not objects.exists(resume_key(JOB)) and ws.resume_uploads == 0
    ws.resume_file.unlink()
    ws.resume_file.write_bytes(b"units")
    ws.sync_resume()
    ws.sync_resume()  # unchanged: not uploaded twice
    assert objects.exists(resume_key(JOB)) and ws.resume_uploads == 1

    (ws.out / "quantized.safetensors").write_bytes(b"weights")
    (ws.out / "évil name.json").write_bytes(b"{}")
    good = hashlib.sha256(b"weights").hexdigest()
    assert ws.publish({"sha256": {"quantized.safetensors": good}}) == [
        {"name": "quantized.safetensors", "sha256": good, "size": 7}]
    assert sorted(p.name for p in (tmp_path / "store" / "jobs" / JOB / "out").iterdir()) == ["quantized.safetensors"]
    with pytest.raises(ArtifactMismatch, match="changed after its report was written"):
        ws.publish({"sha256": {"quantized.safetensors": "0" * 64}})
    ws.close()
    assert not ws.dir.exists()


def test_the_embedded_default_needs_no_boto3(tmp_path):
    """Without CLCALIB_S3_BUCKET nothing imports boto3 (``clcalib serve`` needs only the base
    install); with it and no boto3, the message says what to install."""
    import subprocess
    import sys

    code = f"""
import sys
sys.modules["boto3"] = None  # as if not installed: importing it raises ImportError
import service.app, worker.runner
from jobs.objects import StoreMisconfigured, objects_for
from jobs.settings import Settings
assert objects_for(Settings(data_dir={str(tmp_path)!r})).kind == "local"
try:
    objects_for(Settings(data_dir={str(tmp_path)!r}, s3_bucket="b"))
except StoreMisconfigured as e:
    print(e)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "pip install 'clcalib[s3]'" in r.stdout, r.stdout

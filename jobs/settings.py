"""Service and worker settings, from ``CLCALIB_*`` environment variables (pydantic-settings).

Nothing here imports torch: the API process reads these, and so does the worker before it
imports the library.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CLCALIB_", extra="ignore")

    # where things live
    data_dir: Path = Field(Path("data"), description="uploads, artifacts, the embedded store and queue")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL of the job store; default: SQLite file in data_dir"
    )
    redis_url: str | None = Field(
        None, description="Celery broker; unset: the embedded file-backed queue in data_dir/queue"
    )

    # object storage (jobs/objects.py): unset s3_bucket keeps every byte in data_dir
    s3_bucket: str | None = Field(None, description="S3-compatible bucket for uploads, resume state and artifacts; "
                                  "workers then need no disk shared with the API. Credentials from boto3's chain "
                                  "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_SHARED_CREDENTIALS_FILE); unset: "
                                  "the data folder")
    s3_endpoint_url: str | None = Field(None, description="e.g. http://minio:9000; unset: AWS S3")
    s3_region: str = Field("us-east-1", description="the bucket's region (MinIO accepts any)")
    s3_timeout_s: float = Field(10.0, gt=0, description="connect timeout of one object-store request")
    object_retry_s: float = Field(120.0, ge=0, description="how long a worker retries an unreachable object "
                                  "store (inputs, artifacts) before it fails the job")
    scratch_dir: Path | None = Field(None, description="the worker's private folder for a job's inputs and "
                                     "outputs while it runs (deleted after); default data_dir/scratch")

    # API
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_keys: dict[str, str] = Field(
        default_factory=dict,
        description='JSON object api key -> tenant, e.g. {"k1": "acme"}; empty: loopback-only, one tenant',
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description='JSON list of extra Host names a keyless service answers, e.g. ["calib.lab"] (a name, or '
        'name:port); without keys only 127.0.0.1, localhost and [::1] are answered (other Hosts: 403, against '
        'DNS rebinding). Not used when api_keys is set',
    )
    max_upload_bytes: int = Field(4 << 30, ge=1, description="cap on one upload request (413 above)")
    max_field_bytes: int = Field(1 << 20, ge=1, description="cap on one non-file form field")
    max_active_jobs: int = Field(20, ge=1, description="queued + running jobs one tenant may have; more: 429")
    max_tenant_bytes: int = Field(50 << 30, ge=1, description="upload bytes one tenant may keep stored (jobs whose "
                                  "files are not yet deleted); more: 429")
    body_timeout_s: float = Field(30.0, gt=0, description="an upload whose body sends nothing for this long, or "
                                  "any other request whose body is not complete this long after its headers, is "
                                  "answered 408 and closed (a stalled or deliberately slow client)")
    max_form_bytes: int = Field(64 << 10, ge=1, description="cap on the body of any request but a job upload (the "
                                "sign-in and sign-out forms): 413 above, before the rest is read")
    header_timeout_s: float = Field(10.0, gt=0, description="a connection that sends no complete request headers "
                                    "for this long after opening (or after its last response) is closed")
    max_connections: int = Field(500, ge=1, description="open connections the API serves at once; requests "
                                 "beyond it are answered 503 before anything is read from them")
    min_free_bytes: int = Field(
        1 << 30, ge=0, description="free space kept on the data disk: an upload that would go below it is refused "
        "with 507, and /readyz reports not ready while below it")
    retention_days: float = Field(7.0, ge=0, description="finished jobs' files are deleted after this")
    sweep_interval_s: float = Field(30.0, gt=0, description="how often the reaper/retention sweep runs")
    max_streams_per_tenant: int = Field(20, ge=1, description="event streams (GET /v1/jobs/{id}/events) one tenant "
                                        "may hold open on one API process; more: 429")
    max_uploads_per_tenant: int = Field(4, ge=1, description="upload bodies of one tenant being received at once "
                                        "on one API process (slow bodies hold theirs); more: 429")
    min_body_rate_bytes_s: float = Field(1024.0, ge=0, description="a request body that arrives slower than this, "
                                         "averaged over body_rate_window_s once body_rate_grace_s have passed, is "
                                         "answered 408 and closed (a byte now and then never trips body_timeout_s); 0: off")
    body_rate_window_s: float = Field(10.0, gt=0, description="the window min_body_rate_bytes_s is averaged over")
    body_rate_grace_s: float = Field(10.0, ge=0, description="seconds of a body before its rate is first checked")

    # validation of uploads (runs in a separate process: the API never imports torch)
    validate_workers: int = Field(2, ge=1, le=64, description="upload checks run at once, each in its own "
                                  "warm process (one slow upload must not hold every check)")
    validate_timeout_s: float = Field(300.0, gt=0)
    validate_slots_per_tenant: int = Field(1, ge=1, le=64, description="upload checks one tenant may have running "
                                           "at once (its others wait; another tenant's check never waits behind them)")
    validate_memory_bytes: int = Field(4 << 30, ge=0, description="memory cap of one upload check's sandboxed "
                                       "process (RLIMIT_DATA; 0: none); a check over it is a 422 naming it")
    validate_sample: int = Field(64, ge=1, le=10000, description="images decoded per archive at upload")
    max_archive_entries: int = Field(200_000, ge=1)
    max_archive_bytes: int = Field(8 << 30, ge=1, description="total decompressed size of one archive")
    max_member_bytes: int = Field(64 << 20, ge=1)
    max_image_pixels: int = Field(40_000_000, ge=1, description="one image as stored (from its header)")
    max_sample_pixels: int = Field(2048 * 2048, ge=1, description="one image after preprocess.resize/crop: "
                                   "a tiny image resized to 4096 px would otherwise cost 200 MB of memory")
    max_set_bytes: int = Field(16 << 30, ge=1, description="the decoded calibration set as float32 in the worker "
                               "(the evaluation set streams in batches); the upload check refuses a set that would pass it")

    # the sandbox every upload check and calibration runs in (jobs/sandbox.py)
    sandbox: Literal["on", "off"] = Field("on", description="'off' runs checks and calibrations unconfined: only "
                                           "where every uploaded model and file is trusted")
    sandbox_uid: int = Field(65534, ge=1, description="the uid/gid a sandboxed process of a root service becomes "
                             "(where the Python installation is readable for it)")
    worker_memory_bytes: int = Field(16 << 30, ge=0, description="memory cap of one calibration's sandboxed process "
                                     "(RLIMIT_DATA, host memory; 0: none); a job over it fails naming it, the worker "
                                     "goes on")

    # worker and job lifecycle
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="worker device")
    torch_threads: int | None = Field(None, ge=1, description="torch.set_num_threads in the worker")
    heartbeat_s: float = Field(5.0, gt=0, description="worker heartbeat and progress write period")
    stale_after_s: float = Field(60.0, gt=0, description="a running job with an older heartbeat is re-queued")
    max_attempts: int = Field(3, ge=1, le=100, description="lost workers one job may have before it fails (hand-backs do not count)")
    max_job_runtime_s: float = Field(24 * 3600.0, gt=0, description="a job running longer than this (from its "
                                     "first start, retries included) is failed and its worker stops")
    visibility_timeout_s: int = Field(
        7 * 24 * 3600, ge=60, description="Redis redelivery of unacked messages; longer than any job"
    )
    queue_name: str = Field("clcalib", pattern=r"^[A-Za-z0-9_.-]+$")

    @field_validator("api_keys", mode="before")
    @classmethod
    def _keys(cls, v):
        # also accept "key1:tenantA,key2:tenantB"
        if isinstance(v, str) and v.strip() and not v.strip().startswith("{"):
            pairs = [p.split(":", 1) for p in v.split(",") if p.strip()]
            if any(len(p) != 2 for p in pairs):
                raise ValueError("CLCALIB_API_KEYS: expected JSON {key: tenant} or key:tenant,key:tenant")
            return {k.strip(): t.strip() for k, t in pairs}
        return v

    @property
    def data_limits(self) -> dict[str, int]:
        """The bounds on reading an uploaded image set, as ``clcalib.data.Limits`` fields: the
        upload check and the worker read with the same ones."""
        return {"max_entries": self.max_archive_entries, "max_total_bytes": self.max_archive_bytes,
                "max_member_bytes": self.max_member_bytes, "max_image_pixels": self.max_image_pixels,
                "max_sample_pixels": self.max_sample_pixels, "max_tensor_bytes": self.max_set_bytes}

    @property
    def store_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'jobs.db').resolve()}"

    @property
    def embedded_broker(self) -> bool:
        return not self.redis_url

    @property
    def queue_dir(self) -> Path:
        return self.data_dir / "queue"

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    @property
    def scratch(self) -> Path:
        return self.scratch_dir or self.data_dir / "scratch"


@lru_cache
def get_settings() -> Settings:
    return Settings()


def env_summary(s: Settings) -> str:
    store = s.store_url.split("@")[-1] if "@" in s.store_url else s.store_url
    broker = (s.redis_url or "").split("@")[-1] or f"embedded queue in {s.queue_dir}"
    objects = f"s3 {s.s3_endpoint_url or 'AWS'} bucket {s.s3_bucket}" if s.s3_bucket else "data_dir"
    return f"store={store} broker={broker} objects={objects} data_dir={s.data_dir.resolve()} pid={os.getpid()}"

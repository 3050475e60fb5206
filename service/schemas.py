"""Response models of the API (the request's ``config`` is the library's ``CalibConfig``)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, Field

from jobs.states import State
from jobs.store import Job


def iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, timezone.utc).isoformat().replace("+00:00", "Z")


class Progress(BaseModel):
    stage: str = Field(description="prepare | sensitivity | search | reconstruct | unit_done | export | evaluate | done")
    unit: int = Field(0, description="0-based index of the current reconstruction unit")
    num_units: int = 0
    unit_name: str = ""
    iteration: int = Field(0, description="iterations done in this unit")
    iters: int = Field(0, description="iterations per unit")
    loss: float | None = None
    elapsed_s: float = 0.0
    eta_s: float | None = Field(None, description="estimated seconds left")
    message: str = Field("", description="what the run is doing, e.g. which candidate of an "
                         "accuracy target's search")
    attempt: int = Field(1, description="delivery this progress belongs to")


class Links(BaseModel):
    self: str
    events: str
    artifacts: str
    cancel: str


class JobOut(BaseModel):
    id: str
    state: State
    arch: str
    model: str = Field(description="what the user sent: the registry arch, or the .pt2 program's file name")
    num_classes: int
    config: dict[str, Any] = Field(description="the job's CalibConfig (device is the worker's)")
    progress: Progress | None = None
    metrics: dict[str, Any] | None = Field(None, description="report.json's metrics once succeeded")
    error: str | None = None
    estimate_s: float | None = Field(None, description="estimated seconds the job takes once running: the upload "
                                     "check's measured work times how long recent jobs took on this service's "
                                     "workers for theirs (estimate_basis: how many; 0: the check's own speed)")
    estimate_basis: int | None = None
    artifacts: list[str] = Field(default_factory=list, description="names under /artifacts/{name}")
    artifact_sha256: dict[str, str] = Field(default_factory=dict, description="artifact name -> hex SHA-256 "
                                            "recorded when the worker stored it")
    attempts: int = Field(description="deliveries so far (a lost worker's job is re-queued, a stopped worker's handed back; both resume from the last finished unit)")
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    updated_at: str
    files_deleted: bool = Field(False, description="true once the retention period removed the files")
    links: Links

    @classmethod
    def of(cls, job: Job, base: str = "") -> JobOut:
        u = f"{base}/v1/jobs/{job.id}"
        prog = None
        if job.progress:
            prog = Progress.model_validate({k: (v[:300] if k == "message" and isinstance(v, str) else v)
                                            for k, v in job.progress.items() if k in Progress.model_fields})
        return cls(
            id=job.id, state=job.state, arch=job.arch, model=job.model_file or job.arch, num_classes=job.num_classes,
            config=job.config,
            progress=prog, metrics=job.metrics, error=job.error, artifacts=list(job.artifacts or []),
            artifact_sha256={n: d["sha256"] for n, d in (job.digests or {}).items()},
            estimate_s=_number(job.submitted.get("estimate_s")), estimate_basis=_number(job.submitted.get("estimate_basis")),
            attempts=job.attempts, created_at=iso(job.created_at), started_at=iso(job.started_at),
            finished_at=iso(job.finished_at), updated_at=iso(job.updated_at),
            files_deleted=job.files_deleted,
            links=Links(self=u, events=f"{u}/events", artifacts=f"{u}/artifacts", cancel=f"{u}/cancel"),
        )


def _number(v):
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


class JobList(BaseModel):
    jobs: list[JobOut]
    next_cursor: str | None = Field(None, description="pass as ?cursor= for the next (older) page")


class Artifact(BaseModel):
    name: str
    size: int
    sha256: str | None = Field(None, description="hex SHA-256 of the file as stored (also the download's "
                               "X-Checksum-Sha256 header); null for jobs finished before hashes were recorded")
    url: str


class ArtifactList(BaseModel):
    artifacts: list[Artifact]


class ArchList(BaseModel):
    archs: list[str]


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = Field(default_factory=dict)

"""Job routes. Every route that names a job goes through ``get_owned_job`` (404 for others')."""

from __future__ import annotations

import asyncio
import base64
import json
import logging

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from clcalib.config import Preprocess
from jobs.objects import ObjectMissing, ObjectStoreError, artifact_key, input_key
from jobs.settings import Settings
from jobs.states import State
from jobs.storage import ARTIFACT_TYPES, LowOnDisk, Storage
from jobs.store import PROGRAM, DiskFull, TooManyJobs, new_job_id
from service.connections import tenant_limits
from service.deps import (
    ObjectsDep,
    OwnedJob,
    SettingsDep,
    StorageDep,
    StoreDep,
    Tenant,
    delete_job_files,
    forget,
    store_get,
)
from service.errors import ApiError, insufficient_storage, object_store_error, responses
from service.schemas import Artifact, ArtifactList, JobList, JobOut
from service.uploads import receive
from service.validation import parse_arch, parse_config, parse_num_classes

log = logging.getLogger("clcalib.service")
REPORT_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'self'"
router = APIRouter(tags=["jobs"])

_FILE = {"type": "string", "format": "binary"}
SUBMIT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["model", "calibration"],
                    "properties": {
                        "model": {**_FILE, "description": "with arch: the FP weights, a safetensors file or "
                                  "a PyTorch state_dict (read with torch.load(weights_only=True); a pickle "
                                  "that carries code is refused). Without arch: any model as a torch.export "
                                  "program (.pt2, dynamic batch); one holding pickled objects is refused"},
                        "arch": {"type": "string", "description": "architecture name, one of GET /v1/archs; "
                                 "leave out when model is a .pt2 program"},
                        "num_classes": {"type": "integer", "minimum": 1, "maximum": 100000,
                                        "description": "the model's number of output classes (required with "
                                        "arch; read from the program otherwise)"},
                        "calibration": {**_FILE, "description": "calibration images: a zip or tar of "
                                        "image files (png/jpg/...), or an .npy/.safetensors tensor N x C x H x W: "
                                        "float16/bfloat16/float32/float64 already preprocessed, or uint8 pixels "
                                        "(scaled to [0, 1] and normalised with config.preprocess mean/std)"},
                        "evaluation": {**_FILE, "description": "optional: a zip or tar of class-named "
                                       "folders (0/…, 1/… or names sorted like ImageFolder) to measure "
                                       "FP and quantized top-1 on"},
                        "labels": {**_FILE, "description": "optional, with evaluation: a text file of the "
                                   "model's class names, one per line in index order, so that class-named "
                                   "folders map to the right index (without it they map in sorted order, with "
                                   "a warning)"},
                        "config": {"$ref": "#/components/schemas/CalibConfig",
                                   "description": "the calibration config as JSON (the library's "
                                   "CalibConfig; unknown keys are rejected; device is set by the worker)"},
                    },
                },
                "encoding": {"config": {"contentType": "application/json"}},
            }
        },
    }
}


def _too_many_jobs(settings: Settings, active: int, pending: int = 0) -> ApiError:
    being = f" and {pending} more being submitted" if pending else ""
    return ApiError(429, "too_many_jobs", f"you have {active} queued or running jobs{being}, the limit is "
                    f"{settings.max_active_jobs} (CLCALIB_MAX_ACTIVE_JOBS); wait for one to finish or cancel one",
                    headers={"Retry-After": "60"})


def _check_bytes(settings: Settings, stored: int, incoming: int) -> None:
    """429 when this upload would pass the tenant's stored bytes."""
    if stored + incoming > settings.max_tenant_bytes:
        raise ApiError(429, "storage_quota", f"your jobs keep {stored >> 20} MiB of uploads; this one would pass the "
                       f"limit of {settings.max_tenant_bytes >> 20} MiB: delete finished jobs you no longer need",
                       headers={"Retry-After": "300"})


async def _submitted(store, tenant: str, checked: dict, model_file: str | None) -> dict:
    """The submit's record (``Job.submitted``): the model's file name and the time estimate, the
    check's measured work times the ratio the tenant's recent jobs took on this service's workers."""
    out: dict = {"model_file": model_file} if model_file else {}
    work = checked.get("work_s")
    if isinstance(work, (int, float)) and 0 < work < 1e9:
        factor, basis = await run_in_threadpool(store.speed_factor, tenant)
        out.update(work_s=float(work), estimate_s=round(float(work) * (factor or 1.0), 1), estimate_basis=basis)
    return out


def display_name(name: str | None) -> str | None:
    """The client's file name, for display only: its last path part, printable, at most 100
    characters (it is never a path on this server)."""
    if not name:
        return None
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(ch for ch in base if ch.isprintable()).strip()[:100]
    return base or None


def _is_zip(path) -> bool:
    if path is None:
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"



def _check_space(storage: Storage, reserve: int, incoming: int) -> None:
    try:
        storage.check_space(reserve, incoming)
    except LowOnDisk as e:
        raise insufficient_storage(e) from None

@router.post(
    "/v1/jobs", status_code=202, response_model=JobOut, openapi_extra=SUBMIT_BODY,
    summary="Submit a calibration job (multipart upload)",
    responses=responses(400, 401, 408, 413, 415, 422, 429, 503, 507),
)
async def submit(request: Request, tenant: Tenant, settings: SettingsDep, store: StoreDep,
                 storage: StorageDep, response: Response) -> JobOut:
    """Streams the files to disk (capped; 413 above CLCALIB_MAX_UPLOAD_BYTES), checks every
    input (config, arch, weights against the arch, a decoded sample of the images, one forward
    pass) and only then commits the job row and enqueues its id. Any bad input is a 4xx with a
    message naming the problem; nothing bad reaches a worker."""
    app = request.app
    limits = tenant_limits(app)
    job_id = new_job_id()
    usage = {}

    async def active_besides(reserved: frozenset[str]) -> int:
        usage["active"], usage["stored"] = await run_in_threadpool(store.usage, tenant, reserved)
        return usage["active"]

    # the tenant's active jobs and its submits in flight here, counted and reserved at once: 50
    # concurrent submits at a limit of 3 get 3 slots; the store holds the limit again at the insert
    await _objects_ready(app)  # before the body is read: a store that is down costs no upload
    reserved, active, pending = await limits.reserve_job(tenant, job_id, settings.max_active_jobs, active_besides)
    if not reserved:
        limits.refuse("max_active_jobs")
        raise _too_many_jobs(settings, active, pending)
    try:
        return await _submit(request, tenant, settings, store, storage, response, job_id, usage["stored"], limits)
    finally:
        limits.release_job(tenant, job_id)


async def _submit(request: Request, tenant: str, settings: Settings, store, storage: Storage, response: Response,
                  job_id: str, stored: int, limits) -> JobOut:
    app = request.app
    length = request.headers.get("content-length", "")
    _check_bytes(settings, stored, int(length) if length.isdigit() else 0)
    give_back = limits.take_or_429("uploads", tenant, settings.max_uploads_per_tenant, "max_uploads_per_tenant",
                                   "uploads being sent at once", "wait for one to finish", 30)
    dest = storage.inputs_dir(job_id)
    try:
        try:
            up = await receive(request, dest, max_bytes=settings.max_upload_bytes,
                               max_field_bytes=settings.max_field_bytes,
                               check_space=lambda incoming: _check_space(storage, settings.min_free_bytes, incoming),
                               idle_s=settings.body_timeout_s, min_rate=settings.min_body_rate_bytes_s,
                               rate_window_s=settings.body_rate_window_s, rate_grace_s=settings.body_rate_grace_s)
        finally:
            give_back()  # the body is in (or refused): the tenant may send another
        app.state.metrics.upload_bytes.inc(up.total_bytes)
        config = parse_config(up.texts.get("config"))
        # no arch: the model must be a torch.export program (a zip archive); anything else needs an arch
        program = not (up.texts.get("arch") or "").strip() and _is_zip(up.files.get("model"))
        num_classes = None if program and not (up.texts.get("num_classes") or "").strip() else \
            parse_num_classes(up.texts.get("num_classes"))
        arch = PROGRAM if program else parse_arch(up.texts.get("arch"), await app.state.validator.archs())
        for role in ("model", "calibration"):
            if role not in up.files:
                raise ApiError(422, "missing_file", f"file field {role!r} is required", field=role)
            if up.files[role].stat().st_size == 0:
                raise ApiError(422, "empty_file", f"file field {role!r} is empty", field=role)
        for role in ("evaluation", "labels"):
            if role in up.files and up.files[role].stat().st_size == 0:
                raise ApiError(422, "empty_file", f"file field {role!r} is empty", field=role)
        if "labels" in up.files and "evaluation" not in up.files:
            raise ApiError(422, "bad_data", "a labels file maps the evaluation set's class folders; it needs an "
                           "evaluation set (field 'evaluation')", field="labels")
        if config.target is not None and "evaluation" not in up.files:
            raise ApiError(422, "bad_config", "config.target needs an evaluation set (field 'evaluation'): the "
                           "search measures each candidate's top-1 there", field="evaluation")
        checked = await app.state.validator.check_job(
            tenant=tenant,
            model=str(up.files["model"]), arch=arch, num_classes=num_classes,
            calibration=str(up.files["calibration"]),
            evaluation=str(up.files["evaluation"]) if "evaluation" in up.files else None,
            labels=str(up.files["labels"]) if "labels" in up.files else None,
            config=config.model_dump(mode="json", by_alias=True),
            preprocess_given=sorted(config.preprocess.model_fields_set) if "preprocess" in config.model_fields_set else [],
        )
        num_classes = checked["num_classes"]
        if program and checked.get("preprocess") is not None:  # the program's input size (a checked child's answer: validated)
            try:
                config = config.model_copy(update={"preprocess": Preprocess.model_validate(checked["preprocess"])})
            except ValueError:  # pydantic's ValidationError: not what our check sends; keep the user's config
                log.warning("job %s: the upload check answered an invalid preprocess; ignored", job_id)
        _check_bytes(settings, stored, up.total_bytes)
        inputs = {role: p.relative_to(storage.job_dir(job_id)).as_posix() for role, p in up.files.items()}
        try:  # checked inputs into the object store (in the data folder they are in place already)
            for role, rel in inputs.items() if app.state.objects.kind != "local" else ():
                await run_in_threadpool(app.state.objects.put_file, up.files[role], input_key(job_id, rel))
        except ObjectStoreError as e:
            log.error("job %s: uploads not stored: %s", job_id, e)
            raise object_store_error(e) from None
        try:
            job = await run_in_threadpool(
                store.create, id=job_id, owner=tenant, arch=arch, num_classes=num_classes,
                config=config.model_dump(mode="json", by_alias=True), inputs=inputs,
                upload_bytes=up.total_bytes, max_active=settings.max_active_jobs,
                submitted=await _submitted(store, tenant, checked, display_name(up.filenames.get("model")) if program else None),
            )  # committed before the id is sent
        except TooManyJobs as e:  # another API process's submits took the slots meanwhile
            limits.refuse("max_active_jobs")
            raise _too_many_jobs(settings, e.active) from None
    except BaseException:
        await run_in_threadpool(delete_job_files, storage, app.state.objects, job_id)
        raise
    if app.state.objects.kind != "local":  # the staged copies: workers read the store
        await run_in_threadpool(storage.delete_job, job_id)
    try:
        await run_in_threadpool(app.state.broker.enqueue, job.id)
        await run_in_threadpool(store.mark_enqueued, job.id)
    except Exception as e:  # the sweeper sends it once the broker is back
        log.warning("job %s stored but not enqueued yet (%s); the sweeper will retry", job.id, e)
    log.info("job %s queued for %s: %s %s", job.id, tenant, arch, config.summary())
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return JobOut.of(job)


router.add_api_route(
    "/calibrate", submit, methods=["POST"], status_code=202, response_model=JobOut,
    openapi_extra=SUBMIT_BODY, summary="Submit a calibration job (alias of POST /v1/jobs)",
    responses=responses(400, 401, 413, 415, 422, 503),
)


@router.get("/v1/jobs", response_model=JobList, responses=responses(401, 422),
            summary="The caller's jobs, newest first")
def list_jobs(
    tenant: Tenant, store: StoreDep,
    limit: int = Query(20, ge=1, le=100, description="page size"),
    cursor: str | None = Query(None, max_length=20, pattern=r"^[0-9]+$",
                               description="next_cursor of the previous page"),
    state: State | None = Query(None),
) -> JobList:
    before = int(cursor) if cursor else None
    if before is not None and before > 2**62:
        raise ApiError(422, "bad_cursor", "cursor out of range; use next_cursor from a previous page",
                       field="cursor")
    jobs = store.list(tenant, limit=limit, before_seq=before, state=state)
    nxt = str(jobs[-1].seq) if len(jobs) == limit else None
    return JobList(jobs=[JobOut.of(j) for j in jobs], next_cursor=nxt)


@router.get("/v1/jobs/{job_id}", response_model=JobOut, responses=responses(401, 404),
            summary="Status, progress, metrics and error of a job")
async def get_job(job: OwnedJob) -> JobOut:
    return JobOut.of(job)


@router.get(
    "/v1/jobs/{job_id}/events", responses={**responses(401, 404, 429), 200: {
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
        "description": "server-sent events: `status` (a JobOut as JSON) whenever the job changes, "
                       "then `end` once it is succeeded, failed or canceled (or `deleted`)"}},
    summary="The job's status as a server-sent-event stream", response_class=EventSourceResponse,
)
async def job_events(request: Request, job: OwnedJob, tenant: Tenant, store: StoreDep, settings: SettingsDep,
                     poll_s: float = Query(0.5, ge=0.1, le=10.0, description="poll period of the store")):
    limits = tenant_limits(request.app)
    give_back = limits.take_or_429("streams", tenant, settings.max_streams_per_tenant, "max_streams_per_tenant",
                                   "event streams open", "close one, or poll GET /v1/jobs/{id}", 10)

    async def stream():  # sse-starlette sends pings and stops this when the client goes away
        seen = None
        while True:
            j = await store_get(store, job.id)
            if j is None:
                yield {"event": "deleted", "data": "{}"}
                return
            if (j.updated_at, j.state) != seen:
                seen = (j.updated_at, j.state)
                yield {"id": f"{j.updated_at:.6f}", "event": "status", "data": JobOut.of(j).model_dump_json(),
                       "retry": 2000}
            if j.terminal:
                yield {"event": "end", "data": json.dumps({"state": j.state})}
                return
            await asyncio.sleep(poll_s)

    return _HeldStream(stream(), give_back, ping=15, headers={"X-Accel-Buffering": "no"})


class _HeldStream(EventSourceResponse):
    """An event stream that gives its tenant's stream slot back when it ends, however it ends
    (the job ended, the client went away, the server stops)."""

    def __init__(self, content, give_back, **kwargs):
        super().__init__(content, **kwargs)
        self._give_back = give_back

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._give_back()


async def _objects_ready(app) -> None:
    """503 naming the problem when the object store cannot be used now (checked at most every 5 s
    while it answers)."""
    st = app.state
    if st.objects.kind == "local" or asyncio.get_running_loop().time() < getattr(st, "objects_ok_until", 0.0):
        return
    try:
        await run_in_threadpool(st.objects.check)
    except ObjectStoreError as e:
        log.error("object store not usable: %s", e)
        raise object_store_error(e) from None
    st.objects_ok_until = asyncio.get_running_loop().time() + 5.0


def _artifacts(job, objects) -> list[Artifact]:
    out = []
    for name in job.artifacts or []:
        d = job.digests.get(name)
        size = d["size"] if d else objects.size(artifact_key(job.id, name))  # a row from before hashes
        if size is not None:
            out.append(Artifact(name=name, size=size, sha256=d["sha256"] if d else None,
                                url=f"/v1/jobs/{job.id}/artifacts/{name}"))
    return out


@router.get("/v1/jobs/{job_id}/artifacts", response_model=ArtifactList, responses=responses(401, 404, 503),
            summary="The job's downloadable files (once succeeded), each with its size and SHA-256")
def list_artifacts(job: OwnedJob, objects: ObjectsDep) -> ArtifactList:
    try:
        return ArtifactList(artifacts=_artifacts(job, objects))
    except ObjectStoreError as e:
        raise object_store_error(e) from None


@router.get(
    "/v1/jobs/{job_id}/artifacts/{name}", responses={**responses(401, 404, 503), 200: {
        "content": {"application/octet-stream": {}, "application/json": {}, "text/html": {}},
        "description": "the file, streamed from the object store; `X-Checksum-Sha256` (hex) and `Repr-Digest` "
                       "(RFC 9530) carry its SHA-256 as recorded when the worker stored it"}},
    summary="Download one artifact (quantized.safetensors, model.onnx when config export has \"onnx\", report.json, report.html)",
    response_class=StreamingResponse,
)
def get_artifact(job: OwnedJob, objects: ObjectsDep, name: str):
    if job.files_deleted:
        raise ApiError(404, "expired", "this job's files were deleted after the retention period")
    opened = None
    if name in (job.artifacts or []):
        try:
            opened = objects.open(artifact_key(job.id, name))
        except ObjectMissing:
            pass
        except ObjectStoreError as e:
            raise object_store_error(e) from None
    if opened is None:
        names = ", ".join(job.artifacts or []) or "none yet"
        raise ApiError(404, "not_found", f"no artifact {name[:80]!r} for this job (available: {names})")
    size, chunks = opened  # streamed a chunk at a time (jobs.objects.CHUNK): memory stays bounded
    suffix = "." + name.rsplit(".", 1)[-1]
    headers = {"Content-Length": str(size)}
    digest = job.digests.get(name)
    if digest:
        headers["X-Checksum-Sha256"] = digest["sha256"]
        headers["Repr-Digest"] = f"sha-256=:{base64.b64encode(bytes.fromhex(digest['sha256'])).decode()}:"
    if suffix == ".html":  # the report opens in the browser (and the web page's frame); it runs no script
        headers.update({"Content-Disposition": f'inline; filename="{name}"', "Content-Security-Policy": REPORT_CSP})
    else:
        headers["Content-Disposition"] = f'attachment; filename="{name}"'
    return StreamingResponse(chunks, media_type=ARTIFACT_TYPES.get(suffix, "application/octet-stream"),
                             headers=headers)


@router.post("/v1/jobs/{job_id}/cancel", response_model=JobOut, responses=responses(401, 404, 409, 507),
             summary="Cancel a queued or running job")
def cancel_job(job: OwnedJob, store: StoreDep, storage: StorageDep, objects: ObjectsDep) -> JobOut:
    """A queued job is never started and its uploads are deleted now; a running one stops at its
    worker's next progress callback or heartbeat (seconds), and that worker deletes its files."""
    forget(job.id)
    try:
        canceled = store.cancel(job.id)  # works on a full disk: the store frees its headroom for it
    except DiskFull as e:
        raise insufficient_storage(e) from None
    if not canceled:
        j = store.get(job.id)
        raise ApiError(409, "not_cancelable", f"the job is already {j.state if j else 'deleted'}; nothing to cancel")
    if job.state == State.QUEUED and delete_job_files(storage, objects, job.id):  # no worker reads them now
        try:
            store.mark_files_deleted(job.id)
        except DiskFull:  # the files are gone; the sweeper's retention pass marks the row later
            log.warning("job %s: files deleted but not marked (disk full)", job.id)
    log.info("job %s canceled", job.id)
    return JobOut.of(store.get(job.id))


@router.delete("/v1/jobs/{job_id}", status_code=204, responses=responses(401, 404, 507),
               summary="Delete a job and its files (canceling it first if needed)")
def delete_job(job: OwnedJob, store: StoreDep, storage: StorageDep, objects: ObjectsDep) -> Response:
    forget(job.id)
    try:
        store.cancel(job.id)  # both work on a full disk: the store frees its headroom for them
        store.delete(job.id)
    except DiskFull:  # and if even that is used up: the files go first (they go anyway), then the row
        storage.delete_job(job.id)
        try:
            store.cancel(job.id)
            store.delete(job.id)
        except DiskFull as e:
            raise insufficient_storage(e) from None
    delete_job_files(storage, objects, job.id)  # objects it could not delete: the sweeper's orphan pass
    log.info("job %s deleted", job.id)
    return Response(status_code=204)

"""Health, readiness, metrics and the arch list."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from service.deps import Tenant
from service.errors import responses
from service.schemas import ArchList, Health

router = APIRouter(tags=["system"])


@router.get("/healthz", response_model=Health, summary="Liveness: the process answers")
def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses={503: {"model": Health}},
            summary="Readiness: store, broker, storage and object store reachable")
async def readyz(request: Request, response: Response) -> Health:
    st = request.app.state
    checks = {}
    probes = [("store", st.store.ping), ("broker", st.broker.ping), ("storage", st.storage.writable)]
    if st.objects.kind != "local":  # the data folder is "storage" already
        probes.append(("objects", st.objects.check))
    for name, fn in probes:
        try:
            await run_in_threadpool(fn)
            checks[name] = "ok"
        except Exception as e:
            checks[name] = f"unavailable: {type(e).__name__}: {str(e)[:200]}"
    reserve = request.app.state.settings.min_free_bytes
    try:
        free = await run_in_threadpool(st.storage.free_bytes)
        checks["disk"] = "ok" if free >= reserve else f"low: {free} bytes free, {reserve} kept in reserve"
    except OSError as e:
        checks["disk"] = f"unavailable: {e}"
    ok = all(v == "ok" for v in checks.values())
    response.status_code = 200 if ok else 503
    return Health(status="ok" if ok else "unavailable", checks=checks)


@router.get("/metrics", summary="Prometheus metrics (with API keys configured: any key, as Bearer)",
            response_class=Response, responses={200: {"content": {"text/plain": {}}}, **responses(401)})
async def metrics(request: Request, tenant: Tenant) -> Response:
    """Counts of every tenant's jobs, the queue and the disk: not for anonymous callers. With API
    keys set it needs one (Authorization: Bearer, as the API); keyless, it is served on loopback
    only, like the rest of the API."""
    data = await run_in_threadpool(generate_latest, request.app.state.metrics.registry)
    return Response(data, media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/archs", response_model=ArchList, responses=responses(401, 503),
            summary="Architectures a model can be uploaded as")
async def archs(request: Request, tenant: Tenant) -> ArchList:
    return ArchList(archs=await request.app.state.validator.archs())

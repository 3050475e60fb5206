"""The FastAPI app: ``create_app(settings)``; ``uvicorn --factory service.app:create_app``.

Importing this module imports no torch (pinned by tests/service/test_light_import.py).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from clcalib.config import CalibConfig
from jobs.objects import objects_for
from jobs.settings import Settings, env_summary, get_settings
from jobs.storage import Storage
from jobs.store import Store
from service import web
from service.broker import Broker
from service.docs import add_docs
from service.errors import ApiError, ErrorBody
from service.metrics import Metrics
from service.routes import jobs, system
from service.security import add_security
from service.sweeper import Sweeper
from service.validation import Validator

log = logging.getLogger("clcalib.service")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        st = app.state
        st.storage = Storage(settings.data_dir)  # uploads are staged here while they are checked
        st.objects = objects_for(settings)  # where they go then, and the artifacts come from
        st.store = Store(settings.store_url)
        st.broker = Broker(settings)
        st.validator = Validator(settings)
        st.metrics = Metrics(st.store, st.broker, st.storage)
        st.sweeper = Sweeper(settings, st.store, st.storage, st.broker, st.objects)
        log.info("clcalib API starting: %s", env_summary(settings))
        if not settings.api_keys:
            log.warning("no API keys configured (CLCALIB_API_KEYS): single-tenant mode, "
                        "serve only on loopback")
        st.sweeper.start()
        warm = asyncio.create_task(_warm(st.validator))
        try:
            yield
        finally:
            warm.cancel()
            st.sweeper.stop()
            st.validator.close()
            st.store.close()

    app = FastAPI(
        title="clcalib",
        version="0.1.0",
        summary="Post-training quantization calibration jobs",
        description=(
            "Upload an FP model and calibration images; a worker calibrates a low-bit quantized "
            "model; download the checkpoint and report. All errors have the body "
            "`{detail, code, field}`. Authentication: `Authorization: Bearer <key>` when "
            "CLCALIB_API_KEYS is set; tenants see only their own jobs (404 for others')."
        ),
        lifespan=lifespan,
        docs_url=None,  # served by add_docs from local assets, not a CDN
        redoc_url=None,
    )
    add_docs(app)
    app.state.settings = settings
    add_security(app, settings)  # framing, cross-origin and CSRF checks, sessions, sign-in limit
    app.include_router(jobs.router)
    app.include_router(system.router)
    app.include_router(web.router)
    app.mount("/ui/static", web.static, name="static")

    if not settings.api_keys:
        @app.middleware("http")
        async def _loopback_only(request: Request, call_next):
            """No API keys: whatever the bind address, only loopback clients are served."""
            host = request.client.host if request.client else ""
            if not _is_loopback(host):
                body = ErrorBody(detail="this clcalib server has no API keys configured "
                                 "(CLCALIB_API_KEYS) and only serves loopback clients", code="loopback_only")
                return JSONResponse(body.model_dump(exclude_none=True), status_code=403)
            return await call_next(request)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        # routing's own errors (unknown path, wrong method) in the same body as every other error
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        detail = {404: f"no such path {request.url.path[:200]!r}; see /docs for the API",
                  405: f"{request.method} is not allowed on {request.url.path[:200]!r}; see /docs"}.get(
                      exc.status_code, str(exc.detail))
        return JSONResponse(ErrorBody(detail=detail, code=code).model_dump(exclude_none=True),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        ref = uuid.uuid4().hex[:12]
        log.error("internal error %s on %s %s", ref, request.method, request.url.path, exc_info=exc)
        body = ErrorBody(detail=f"an internal error (reference {ref}, logged on the server); retry, and report "
                         "it with the reference if it persists", code="internal_error")
        return JSONResponse(body.model_dump(exclude_none=True), status_code=500)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = [{"loc": list(map(str, e.get("loc", ()))), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()]
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        where = ".".join(first["loc"][1:]) or ".".join(first["loc"])
        body = ErrorBody(detail=f"{where}: {first['msg']}", code="invalid_request",
                         field=first["loc"][-1] if first["loc"] else None, errors=errors)
        return JSONResponse(body.model_dump(exclude_none=True), status_code=422)

    def openapi():
        if app.openapi_schema:
            return app.openapi_schema
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, summary=app.summary,
                             description=app.description, routes=app.routes)
        defs = CalibConfig.model_json_schema(ref_template="#/components/schemas/{model}")
        comps = schema.setdefault("components", {}).setdefault("schemas", {})
        comps.update(defs.pop("$defs", {}))
        comps["CalibConfig"] = defs
        app.openapi_schema = schema
        return schema

    app.openapi = openapi
    return app


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host in ("localhost", "testclient"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def _warm(validator: Validator) -> None:
    try:
        await validator.archs()  # starts the validator child and imports torch there
    except Exception as e:
        log.warning("validator warm-up failed: %s", e)

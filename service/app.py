"""The FastAPI app: ``create_app(settings)``; ``uvicorn --factory service.app:create_app``.

Importing this module imports no torch (pinned by tests/service/test_svc_light_import.py).
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from clcalib.config import CalibConfig
from jobs.objects import objects_for
from jobs.settings import Settings, env_summary, get_settings
from jobs.storage import Storage
from jobs.store import Store
from service import web
from service.bodies import SmallBodies
from service.broker import Broker
from service.docs import add_docs
from service.error_handlers import add_error_handlers
from service.metrics import Metrics
from service.routes import jobs, system
from service.security import add_loopback_only, add_security
from service.sweeper import Sweeper
from service.validation import Validator

log = logging.getLogger("clcalib.service")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
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
        lifespan=_lifespan(settings),
        docs_url=None,  # served by add_docs from local assets, not a CDN
        redoc_url=None,
    )
    add_docs(app)
    app.state.settings = settings
    # every body but an upload's is read whole, in time and capped, before a route sees it (inside
    # the security middleware: a request that refuses is never waited for)
    app.add_middleware(SmallBodies, settings=settings)
    add_security(app, settings)  # framing, cross-origin and CSRF checks, sessions, sign-in limit
    app.include_router(jobs.router)
    app.include_router(system.router)
    app.include_router(web.router)
    app.mount("/ui/static", web.static, name="static")
    if not settings.api_keys:
        add_loopback_only(app)
    add_error_handlers(app)
    app.openapi = lambda: _openapi(app)
    return app


def _lifespan(settings: Settings):
    """The app's shared state, built at startup and closed at shutdown."""

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

    return lifespan


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema, with CalibConfig and its parts added to the components (a job's config)."""
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


async def _warm(validator: Validator) -> None:
    try:
        await validator.archs()  # starts the validator child and imports torch there
    except Exception as e:
        log.warning("validator warm-up failed: %s", e)

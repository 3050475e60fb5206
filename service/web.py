"""The web page for a person: sign in, the tenant's jobs, a submit form, a job's live progress,
its report and downloads. Server-rendered (Jinja2), a little plain JS for the form, the event
stream and the buttons; every asset is served from here (no CDN).

The page uses the JSON API itself, authenticated by the sign-in cookie (the same API key,
HttpOnly, SameSite=Strict) instead of an Authorization header.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool

from clcalib.config import CalibConfig, Method
from jobs.states import State
from service.deps import KEY_COOKIE, LOCAL_TENANT, StoreDep, store_get, tenant_of
from service.errors import ApiError
from service.schemas import JobOut

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")
router = APIRouter(include_in_schema=False)
static = StaticFiles(directory=HERE / "static")


def _tenant(request: Request) -> str | None:
    """The signed-in tenant, or None (no cookie, or a key no longer configured)."""
    keys = request.app.state.settings.api_keys
    if not keys:
        return LOCAL_TENANT
    key = request.cookies.get(KEY_COOKIE)
    return tenant_of(keys, key) if key else None


def _page(request: Request, name: str, **ctx) -> HTMLResponse:
    return templates.TemplateResponse(request, name, {"keyless": not request.app.state.settings.api_keys, **ctx})


@router.get("/", response_class=HTMLResponse)
async def home(request: Request, store: StoreDep, state: State | None = None):
    tenant = _tenant(request)
    if tenant is None:
        return _page(request, "login.html.j2", error=None)
    jobs = await run_in_threadpool(store.list, tenant, 50, None, state)
    archs = await request.app.state.validator.archs()  # from the validator child: this process never imports torch
    cfg = CalibConfig()
    return _page(request, "jobs.html.j2", tenant=tenant, jobs=[JobOut.of(j) for j in jobs], archs=archs,
                 methods=[m.value for m in Method], states=[s.value for s in State], state=state, cfg=cfg)


@router.post("/login")
async def login(request: Request, key: Annotated[str, Form(max_length=500)] = ""):
    keys = request.app.state.settings.api_keys
    if keys and tenant_of(keys, key) is None:
        return _page(request, "login.html.j2", error="unknown API key")
    resp = RedirectResponse("/", status_code=303)
    if keys:
        resp.set_cookie(KEY_COOKIE, key, httponly=True, samesite="strict", secure=request.url.scheme == "https")
    return resp


@router.post("/logout")
async def logout():
    resp = RedirectResponse("/", status_code=303)
    resp.delete_cookie(KEY_COOKIE)
    return resp


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
async def job_page(request: Request, job_id: str, store: StoreDep):
    tenant = _tenant(request)
    if tenant is None:
        return RedirectResponse("/", status_code=303)
    job = await store_get(store, job_id) if job_id.isalnum() else None
    if job is None or job.owner != tenant:
        raise ApiError(404, "not_found", "no such job (or it belongs to another tenant)")
    return _page(request, "job.html.j2", tenant=tenant, job=JobOut.of(job))


@router.get("/favicon.ico")
async def favicon():
    return Response(status_code=204)

"""The web page for a person: sign in, the tenant's jobs, a submit form, a job's live progress,
its report and downloads. Server-rendered (Jinja2), a little plain JS for the form, the event
stream and the buttons; every asset is served from here (no CDN).

The page uses the JSON API itself, authenticated by the sign-in cookie (a random session id
mapped to the tenant in this process, HttpOnly, SameSite=Strict; never the API key) instead of an
Authorization header, and sends its session's CSRF token with every change (service/security.py
checks it, and the request's origin). Every template is autoescaped, whatever its file name.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, FileSystemLoader
from starlette.concurrency import run_in_threadpool

from clcalib.config import CalibConfig, ExportTarget, Method
from jobs.states import State
from service.deps import LOCAL_TENANT, StoreDep, owned_job, tenant_of
from service.errors import ApiError
from service.schemas import JobOut
from service.security import (
    PAGE_CSP,
    SESSION_COOKIE,
    LoginLimiter,
    check_form_csrf,
    csrf_token,
    session_of,
    set_csrf_cookie,
)

HERE = Path(__file__).parent
# autoescape=True for every template: Starlette's default (select_autoescape) escapes only
# .html/.htm/.xml names, and these are *.html.j2
templates = Jinja2Templates(env=Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=True))
router = APIRouter(include_in_schema=False)
static = StaticFiles(directory=HERE / "static")


def _tenant(request: Request) -> str | None:
    """The signed-in tenant, or None (no session, or an expired or signed-out one)."""
    if not request.app.state.settings.api_keys:
        return LOCAL_TENANT
    s = session_of(request)
    return s.tenant if s is not None else None


def _page(request: Request, name: str, status_code: int = 200, headers: dict | None = None, **ctx) -> HTMLResponse:
    token, new = csrf_token(request, signed_in=name != "login.html.j2")
    resp = templates.TemplateResponse(request, name, {"keyless": not request.app.state.settings.api_keys,
                                                      "csrf": token, **ctx}, status_code=status_code, headers=headers)
    resp.headers["Content-Security-Policy"] = PAGE_CSP
    resp.headers["Cache-Control"] = "no-store"  # the page holds the session's CSRF token
    if new:
        set_csrf_cookie(request, resp, token)
    return resp


@router.get("/", response_class=HTMLResponse)
async def home(request: Request, store: StoreDep, state: State | None = None):
    tenant = _tenant(request)
    if tenant is None:
        return _page(request, "login.html.j2", error=None)
    jobs = await run_in_threadpool(store.list, tenant, 50, None, state)
    archs = await request.app.state.validator.archs()  # from the validator child: this process never imports torch
    cfg = CalibConfig()
    return _page(request, "jobs.html.j2", tenant=tenant, jobs=[JobOut.of(j) for j in jobs], archs=archs,
                 methods=[m.value for m in Method], states=[s.value for s in State], state=state, cfg=cfg,
                 export_targets=typing.get_args(ExportTarget))


@router.post("/login")
async def login(request: Request, key: Annotated[str, Form(max_length=500)] = "",
                csrf_token: Annotated[str, Form(max_length=200)] = ""):
    """The origin was checked by the middleware; here the form's CSRF token, the per-address
    limit on failed keys (429 with Retry-After), then the key."""
    if not check_form_csrf(request, csrf_token, signed_in=False):
        return _page(request, "login.html.j2", 403, error="the sign-in form had expired or came from another "
                     "page; sign in again")
    keys = request.app.state.settings.api_keys
    limiter = request.app.state.login_limiter
    who = LoginLimiter.client(request)
    wait = limiter.retry_after(who)
    if wait is not None:
        return _page(request, "login.html.j2", 429, headers={"Retry-After": str(wait)},
                     error=f"too many wrong keys from your address; try again in {wait} s")
    tenant = tenant_of(keys, key) if keys else LOCAL_TENANT
    if tenant is None:
        limiter.failed(who)
        return _page(request, "login.html.j2", error="unknown API key")
    resp = RedirectResponse("/", status_code=303)
    if keys:
        sessions = request.app.state.sessions
        sessions.drop(request.cookies.get(SESSION_COOKIE))  # a new id at every sign-in (no fixation)
        sid, _ = sessions.create(tenant)
        resp.set_cookie(SESSION_COOKIE, sid, max_age=int(sessions.ttl_s), path="/", httponly=True,
                        samesite="strict", secure=request.url.scheme == "https")
    return resp


@router.post("/logout")
async def logout(request: Request, csrf_token: Annotated[str, Form(max_length=200)] = ""):
    if session_of(request) is not None:
        if not check_form_csrf(request, csrf_token, signed_in=True):
            raise ApiError(403, "csrf_failed", "missing or wrong csrf_token in the sign-out form; reload the page")
        request.app.state.sessions.drop(request.cookies.get(SESSION_COOKIE))
    resp = RedirectResponse("/", status_code=303)
    resp.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict",
                       secure=request.url.scheme == "https")
    return resp


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
async def job_page(request: Request, job_id: str, store: StoreDep):
    tenant = _tenant(request)
    if tenant is None:
        return RedirectResponse("/", status_code=303)
    job = await owned_job(store, job_id, tenant)
    return _page(request, "job.html.j2", tenant=tenant, job=JobOut.of(job))


@router.get("/favicon.ico")
async def favicon():
    return Response(status_code=204)

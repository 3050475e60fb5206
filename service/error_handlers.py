"""Every error the API answers has one body, ``ErrorBody`` ``{detail, code, field}``: the
handlers that turn the library's, routing's, validation's and unexpected errors into it."""

from __future__ import annotations

import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import ApiError, ErrorBody

log = logging.getLogger("clcalib.service")


async def _api_error(request: Request, exc: ApiError):
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _http_error(request: Request, exc: StarletteHTTPException):
    # routing's own errors (unknown path, wrong method) in the same body as every other error
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    detail = {404: f"no such path {request.url.path[:200]!r}; see /docs for the API",
              405: f"{request.method} is not allowed on {request.url.path[:200]!r}; see /docs"}.get(
                  exc.status_code, str(exc.detail))
    return JSONResponse(ErrorBody(detail=detail, code=code).model_dump(exclude_none=True),
                        status_code=exc.status_code, headers=getattr(exc, "headers", None))


async def _internal_error(request: Request, exc: Exception):
    ref = uuid.uuid4().hex[:12]
    log.error("internal error %s on %s %s", ref, request.method, request.url.path, exc_info=exc)
    body = ErrorBody(detail=f"an internal error (reference {ref}, logged on the server); retry, and report "
                     "it with the reference if it persists", code="internal_error")
    return JSONResponse(body.model_dump(exclude_none=True), status_code=500)


async def _validation(request: Request, exc: RequestValidationError):
    errors = [{"loc": list(map(str, e.get("loc", ()))), "msg": e.get("msg", ""), "type": e.get("type", "")}
              for e in exc.errors()]
    first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
    where = ".".join(first["loc"][1:]) or ".".join(first["loc"])
    body = ErrorBody(detail=f"{where}: {first['msg']}", code="invalid_request",
                     field=first["loc"][-1] if first["loc"] else None, errors=errors)
    return JSONResponse(body.model_dump(exclude_none=True), status_code=422)


def add_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    app.add_exception_handler(RequestValidationError, _validation)

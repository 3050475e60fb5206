"""Errors the API answers with. Every 4xx body has the same shape::

    {"detail": "<what was wrong and what to do>", "code": "<stable id>", "field": "<form field or null>"}

and every body is bounded in one place, ``ErrorBody``: whatever an input holds, an error body stays
a few kilobytes (``detail`` at most 2000 characters, the first 20 ``errors``, ``more_errors``).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, model_validator

MAX_DETAIL_CHARS = 2000  # an error body echoes user input (names, values): bounded
MAX_ERRORS = 20  # entries of ``errors`` kept; the rest are counted in ``more_errors``
MAX_ERROR_TEXT = 200  # one string of an ``errors`` entry (a loc part, msg, type)
MAX_LOC_PARTS = 8


def cut(text: str, limit: int) -> str:
    """``text`` in at most ``limit`` characters, saying how many were left out."""
    if len(text) <= limit:
        return text
    tail = f"... ({len(text)} characters in all)"
    return text[:max(0, limit - len(tail))] + tail


def _bounded_entry(e: Any) -> dict[str, Any]:
    if not isinstance(e, dict):
        return {"msg": cut(str(e), MAX_ERROR_TEXT)}
    out: dict[str, Any] = {}
    for k in ("loc", "msg", "type"):
        v = e.get(k)
        if isinstance(v, (list, tuple)):
            out[k] = [cut(str(p), MAX_ERROR_TEXT) for p in v[:MAX_LOC_PARTS]] + (["..."] if len(v) > MAX_LOC_PARTS else [])
        elif v is not None:
            out[k] = cut(str(v), MAX_ERROR_TEXT)
    return out


class ErrorBody(BaseModel):
    """Every error body, whoever builds it, is bounded here: ``detail`` to 2000 characters, ``errors``
    to its first 20 entries (each string in them to 200 characters) with ``more_errors`` counting
    the rest, so no input makes an error body large or slow to build."""

    detail: str = Field(description=f"what was expected, what came, and what to do (at most {MAX_DETAIL_CHARS} characters)")
    code: str = Field(description="stable machine-readable error id, e.g. model_mismatch, too_large")
    field: str | None = Field(None, description="the form field or parameter at fault, if any")
    errors: list[dict[str, Any]] | None = Field(
        None, description=f"per-field details (config validation), the first {MAX_ERRORS}")
    more_errors: int | None = Field(None, description=f"how many per-field details there were beyond the first {MAX_ERRORS}")

    @model_validator(mode="before")
    @classmethod
    def _bounded(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if isinstance(data.get("detail"), str):
            data["detail"] = cut(data["detail"], MAX_DETAIL_CHARS)
        if isinstance(data.get("field"), str):
            data["field"] = cut(data["field"], MAX_ERROR_TEXT)
        errors = data.get("errors")
        if isinstance(errors, (list, tuple)):
            if len(errors) > MAX_ERRORS:
                data["more_errors"] = (data.get("more_errors") or 0) + len(errors) - MAX_ERRORS
            data["errors"] = [_bounded_entry(e) for e in errors[:MAX_ERRORS]]
        return data


class ApiError(Exception):
    def __init__(self, status: int, code: str, detail: str, *, field: str | None = None,
                 errors: list[dict] | None = None, headers: dict | None = None):
        detail = cut(detail, MAX_DETAIL_CHARS)
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail
        self.field, self.headers = field, headers
        self.errors = errors[:MAX_ERRORS + 1] if errors is not None else None  # ErrorBody counts the rest
        self.more_errors = max(0, len(errors) - MAX_ERRORS - 1) if errors is not None else 0

    def body(self) -> dict:
        return ErrorBody(detail=self.detail, code=self.code, field=self.field, errors=self.errors,
                         more_errors=self.more_errors or None).model_dump(exclude_none=True)


def insufficient_storage(why: Exception) -> ApiError:
    return ApiError(507, "insufficient_storage", str(why), headers={"Retry-After": "300"})


def not_found(what: str = "job") -> ApiError:
    return ApiError(404, "not_found", f"no such {what} (or it belongs to another tenant)")


def responses(*codes: int) -> dict[int, dict]:
    """OpenAPI ``responses`` entries for error codes, all with ErrorBody."""
    text = {
        400: "malformed request body",
        401: "missing or unknown API key (Authorization: Bearer <key>)",
        404: "no such job or file for this tenant (others' jobs are 404 too)",
        408: "the request's body stalled (nothing for CLCALIB_BODY_TIMEOUT_S; a body other than an upload's: "
             "not complete within it) or arrived slower than CLCALIB_MIN_BODY_RATE_BYTES_S",
        409: "the job is not in a state that allows this",
        413: "upload larger than CLCALIB_MAX_UPLOAD_BYTES (any other request's body: CLCALIB_MAX_FORM_BYTES)",
        415: "not multipart/form-data",
        422: "invalid input; `detail` names the problem and `field` the form field",
        429: "the tenant is at one of its limits (Retry-After): active jobs, stored upload bytes, uploads being "
             "received, open event streams; `detail` names the setting. Or too many wrong API keys came from the "
             "client's address (`too_many_wrong_keys`)",
        503: "a dependency (store, broker, validator) is unavailable; retry later",
        507: "the server's data disk is low (CLCALIB_MIN_FREE_BYTES kept free); retry later (Retry-After)",
    }
    return {c: {"model": ErrorBody, "description": text[c]} for c in codes}


def object_store_error(why: Exception) -> ApiError:
    """503 naming what the object store did not do (unreachable, credentials, bucket): the
    operator's to fix, the client's to retry."""
    return ApiError(503, "object_store_unavailable", f"{str(why)[:600]}; try again later", headers={"Retry-After": "30"})

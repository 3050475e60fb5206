"""Errors the API answers with. Every 4xx body has the same shape::

    {"detail": "<what was wrong and what to do>", "code": "<stable id>", "field": "<form field or null>"}
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    detail: str = Field(description="what was expected, what came, and what to do")
    code: str = Field(description="stable machine-readable error id, e.g. model_mismatch, too_large")
    field: str | None = Field(None, description="the form field or parameter at fault, if any")
    errors: list[dict[str, Any]] | None = Field(None, description="per-field details (config validation)")


MAX_DETAIL_CHARS = 2000  # an error body echoes user input (names, values): bounded


class ApiError(Exception):
    def __init__(self, status: int, code: str, detail: str, *, field: str | None = None,
                 errors: list[dict] | None = None, headers: dict | None = None):
        if len(detail) > MAX_DETAIL_CHARS:
            detail = detail[:MAX_DETAIL_CHARS] + f"... ({len(detail) - MAX_DETAIL_CHARS} more characters)"
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail
        self.field, self.errors, self.headers = field, errors, headers

    def body(self) -> dict:
        return ErrorBody(detail=self.detail, code=self.code, field=self.field,
                         errors=self.errors).model_dump(exclude_none=True)


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
        408: "the upload's body stalled (nothing for CLCALIB_BODY_TIMEOUT_S)",
        409: "the job is not in a state that allows this",
        413: "upload larger than CLCALIB_MAX_UPLOAD_BYTES",
        415: "not multipart/form-data",
        422: "invalid input; `detail` names the problem and `field` the form field",
        429: "the tenant is at its limit of active jobs or stored upload bytes (Retry-After)",
        503: "a dependency (store, broker, validator) is unavailable; retry later",
        507: "the server's data disk is low (CLCALIB_MIN_FREE_BYTES kept free); retry later (Retry-After)",
    }
    return {c: {"model": ErrorBody, "description": text[c]} for c in codes}

"""Request dependencies: the app's components, the caller's tenant, and the one ownership
check (``get_owned_job``) every job route goes through."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from service.errors import ApiError, not_found
from service.settings import Settings
from service.storage import Storage
from service.store import Job, Store

LOCAL_TENANT = "local"
bearer = HTTPBearer(auto_error=False, description="API key, mapped to a tenant by CLCALIB_API_KEYS")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_store(request: Request) -> Store:
    return request.app.state.store


def get_storage(request: Request) -> Storage:
    return request.app.state.storage


def get_tenant(
    request: Request,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> str:
    keys: dict[str, str] = request.app.state.settings.api_keys
    if not keys:
        return LOCAL_TENANT  # no keys configured: loopback-only single-tenant mode
    if creds is None or creds.scheme.lower() != "bearer":
        raise ApiError(401, "unauthorized", "missing API key; send Authorization: Bearer <key>",
                       headers={"WWW-Authenticate": "Bearer"})
    token = creds.credentials.encode()
    tenant = None
    for key, t in keys.items():  # compare against every key: timing does not reveal which matched
        if hmac.compare_digest(key.encode(), token):
            tenant = t
    if tenant is None:
        raise ApiError(401, "unauthorized", "unknown API key", headers={"WWW-Authenticate": "Bearer"})
    return tenant


Tenant = Annotated[str, Depends(get_tenant)]


async def get_owned_job(
    job_id: Annotated[str, Path(description="job id (32 hex characters)", max_length=64)],
    tenant: Tenant,
    store: Annotated[Store, Depends(get_store)],
) -> Job:
    job = await run_in_threadpool(store.get, job_id) if job_id.isalnum() else None
    if job is None or not hmac.compare_digest(job.owner.encode(), tenant.encode()):
        raise not_found()
    return job


OwnedJob = Annotated[Job, Depends(get_owned_job)]
StoreDep = Annotated[Store, Depends(get_store)]
StorageDep = Annotated[Storage, Depends(get_storage)]
SettingsDep = Annotated[Settings, Depends(get_settings)]

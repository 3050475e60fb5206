"""Request dependencies: the app's components, the caller's tenant, and the one ownership
check (``get_owned_job``) every job route goes through."""

from __future__ import annotations

import hmac
import logging
import time
from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from jobs.objects import Objects, ObjectStoreError
from jobs.settings import Settings
from jobs.storage import Storage
from jobs.store import Job, Store
from service.errors import ApiError, not_found
from service.security import SESSION_COOKIE, LoginLimiter, session_of

log = logging.getLogger("clcalib.service")
LOCAL_TENANT = "local"
ROW_TTL_S = 0.2  # many pollers of one job share one read of its row per TTL, per API process


class RowCache:
    """A tiny time-bounded cache of job rows: 200 clients polling the same job cost one store
    read per 0.2 s. Writes through this process (cancel, delete) drop the entry."""

    def __init__(self, ttl: float = ROW_TTL_S, size: int = 4096):
        self.ttl, self.size = ttl, size
        self._d: dict[str, tuple[float, Job | None]] = {}

    def get(self, job_id: str):
        hit = self._d.get(job_id)
        if hit is not None and time.monotonic() - hit[0] < self.ttl:
            return hit
        return None

    def put(self, job_id: str, job: Job | None) -> None:
        if len(self._d) >= self.size:
            self._d.clear()
        self._d[job_id] = (time.monotonic(), job)

    def drop(self, job_id: str) -> None:
        self._d.pop(job_id, None)


_cache = RowCache()


async def store_get(store: Store, job_id: str) -> Job | None:
    hit = _cache.get(job_id)
    if hit is not None:
        return hit[1]
    job = await run_in_threadpool(store.get, job_id)
    _cache.put(job_id, job)
    return job


def forget(job_id: str) -> None:
    _cache.drop(job_id)
bearer = HTTPBearer(auto_error=False, description="API key, mapped to a tenant by CLCALIB_API_KEYS")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_store(request: Request) -> Store:
    return request.app.state.store


def get_storage(request: Request) -> Storage:
    return request.app.state.storage


def get_objects(request: Request) -> Objects:
    return request.app.state.objects


def delete_job_files(storage: Storage, objects: Objects, job_id: str) -> bool:
    """A job's uploads staged on this API's disk and its objects (in the data folder they are the
    same files); False when the object store could not do it (the sweeper tries again: objects of
    jobs it does not know, files of expired jobs not yet marked deleted)."""
    storage.delete_job(job_id)
    try:
        objects.delete_job(job_id)
    except ObjectStoreError as e:
        log.warning("job %s: objects not deleted yet (%s)", job_id, e)
        return False
    return True




def tenant_of(keys: dict[str, str], key: str) -> str | None:
    """The tenant of an API key, or None. Compared against every key: the time taken does not
    reveal which one matched."""
    tenant = None
    for k, t in keys.items():
        if hmac.compare_digest(k.encode(), key.encode()):
            tenant = t
    return tenant


async def get_tenant(
    request: Request,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> str:
    """The caller's tenant. A Bearer key counts in the sign-in limiter like a key typed into the
    sign-in form (one limit per address, however the keys come); async, so that the limit's
    check, the key's comparison and the failure's count run with no other request between them
    on the event loop (in the threadpool, concurrent guesses would all pass the check)."""
    keys: dict[str, str] = request.app.state.settings.api_keys
    if not keys:
        return LOCAL_TENANT  # no keys configured: loopback-only single-tenant mode
    if creds is not None and creds.scheme.lower() == "bearer":
        key = creds.credentials
    elif request.cookies.get(SESSION_COOKIE):  # the browser: its sign-in session (service/security.py)
        session = session_of(request)
        if session is None:
            raise ApiError(401, "unauthorized", "the sign-in has expired or was signed out; sign in again",
                           headers={"WWW-Authenticate": "Bearer"})
        return session.tenant
    else:
        raise ApiError(401, "unauthorized", "missing API key; send Authorization: Bearer <key>",
                       headers={"WWW-Authenticate": "Bearer"})
    limiter: LoginLimiter = request.app.state.login_limiter
    who = LoginLimiter.client(request)
    wait = limiter.retry_after(who)
    if wait is not None:  # before the comparison: a limited address learns nothing, the right key included
        raise ApiError(429, "too_many_wrong_keys", f"too many wrong API keys from your address ({limiter.max_failures} "
                       f"in {limiter.window_s:.0f}s, by Bearer or the sign-in form); try again in {wait} s",
                       headers={"Retry-After": str(wait)})
    tenant = tenant_of(keys, key)
    if tenant is None:
        limiter.failed(who)
        raise ApiError(401, "unauthorized", "unknown API key", headers={"WWW-Authenticate": "Bearer"})
    return tenant


Tenant = Annotated[str, Depends(get_tenant)]


async def get_owned_job(
    job_id: Annotated[str, Path(description="job id (32 hex characters)", max_length=64)],
    tenant: Tenant,
    store: Annotated[Store, Depends(get_store)],
) -> Job:
    return await owned_job(store, job_id, tenant)


async def owned_job(store: Store, job_id: str, tenant: str) -> Job:
    """The job, when ``tenant`` owns it; else 404, the same for a job that does not exist (the
    owner compared in constant time). The API's dependency above and the web page both use it."""
    job = await store_get(store, job_id) if job_id.isalnum() else None
    if job is None or not hmac.compare_digest(job.owner.encode(), tenant.encode()):
        raise not_found()
    return job


OwnedJob = Annotated[Job, Depends(get_owned_job)]
StoreDep = Annotated[Store, Depends(get_store)]
StorageDep = Annotated[Storage, Depends(get_storage)]
ObjectsDep = Annotated[Objects, Depends(get_objects)]
SettingsDep = Annotated[Settings, Depends(get_settings)]

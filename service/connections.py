"""Slow clients and too many of them: uvicorn's HTTP protocol with a header deadline and a
connection limit.

uvicorn closes idle keep-alive connections and the API answers a stalled body with 408
(``service.uploads``), but nothing bounds the time a client may take to send a request's
headers: a connection opened and left silent, or fed a byte at a time, is kept forever
(slowloris). The protocol here closes a connection that has not completed the headers of a
request within ``header_timeout_s`` of opening, or of its previous response, and answers a
connection beyond ``max_connections`` with 503 (the API's error body, Retry-After) before
reading anything from it.
"""

from __future__ import annotations

import asyncio
import json

from service.errors import ErrorBody


def _too_many(max_connections: int) -> bytes:
    body = json.dumps(ErrorBody(detail=f"the server has {max_connections} open connections, its limit "
                                "(CLCALIB_MAX_CONNECTIONS); retry shortly", code="too_many_connections")
                      .model_dump(exclude_none=True)).encode()
    return (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 5\r\n"
            b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def protocol(header_timeout_s: float, max_connections: int) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class (httptools when installed, else h11) with the deadline and
    the limit."""
    refusal = _too_many(max_connections)
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base

    class HeaderDeadline(Base):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)  # adds this one to self.connections
            self._refused = len(self.connections) > max_connections
            if self._refused:
                # answer, half-close, and drop what the client sends for a moment before closing:
                # closing with its request unread would reset the connection and lose the answer
                transport.write(refusal)
                if transport.can_write_eof():
                    transport.write_eof()
                self.loop.call_later(2.0, transport.close)
                return
            self._arm_header_deadline()

        def data_received(self, data: bytes) -> None:
            if not self._refused:
                super().data_received(data)

        def _arm_header_deadline(self) -> None:
            # the protocol makes a new cycle when a request's headers are complete
            self._cycle_at_arm = self.cycle
            self._header_timer = self.loop.call_later(header_timeout_s, self._header_deadline)

        def _header_deadline(self) -> None:
            if self.cycle is self._cycle_at_arm and not self.transport.is_closing():
                self.logger.info("closing a connection that sent no complete request headers in %.0fs",
                                 header_timeout_s)
                self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._header_timer.cancel()
            if not self.transport.is_closing():
                self._arm_header_deadline()

        def connection_lost(self, exc) -> None:
            timer = getattr(self, "_header_timer", None)
            if timer is not None:
                timer.cancel()
            super().connection_lost(exc)

    return HeaderDeadline


class TenantLimits:
    """What one tenant holds in this API process, counted so that no tenant starves the others:
    event streams open and upload bodies being received (``take``: a release function, or None
    at the limit), and reservations of active-job slots for submits in flight (``reserve_job``).

    Everything here runs on the event loop (no thread touches it); a reservation's check, the
    store's count of the tenant's active jobs plus its reservations here, runs under a lock of
    that tenant, so two submits cannot both take the last slot. The store holds the same limit
    again at the insert, for submits to other API processes."""

    def __init__(self):
        self._held: dict[tuple[str, str], int] = {}
        self._jobs: dict[str, set[str]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.refused: dict[str, int] = {}  # limit name -> refusals, for /metrics

    def held(self, kind: str, tenant: str) -> int:
        return self._held.get((kind, tenant), 0)

    def totals(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for (kind, _), n in self._held.items():
            out[kind] = out.get(kind, 0) + n
        out["job_reservations"] = sum(len(v) for v in self._jobs.values())
        return out

    def refuse(self, limit: str) -> None:
        self.refused[limit] = self.refused.get(limit, 0) + 1

    def take_or_429(self, kind: str, tenant: str, limit: int, setting: str, what: str, advice: str, retry_after: int):
        """``take``, or a 429 ``too_many_<kind>`` naming the setting (and counted for /metrics)."""
        from service.errors import ApiError

        release = self.take(kind, tenant, limit)
        if release is None:
            self.refuse(setting)
            raise ApiError(429, f"too_many_{kind}", f"you have {self.held(kind, tenant)} {what}, the limit is {limit} "
                           f"(CLCALIB_{setting.upper()}); {advice}", headers={"Retry-After": str(retry_after)})
        return release

    def take(self, kind: str, tenant: str, limit: int):
        """One more ``kind`` for ``tenant``: a function that gives it back (once, however often it
        is called), or None when the tenant already holds ``limit``."""
        key = (kind, tenant)
        if self._held.get(key, 0) >= limit:
            return None
        self._held[key] = self._held.get(key, 0) + 1
        given_back = False

        def release() -> None:
            nonlocal given_back
            if given_back:
                return
            given_back = True
            n = self._held.get(key, 0) - 1
            if n > 0:
                self._held[key] = n
            else:
                self._held.pop(key, None)

        return release

    async def reserve_job(self, tenant: str, job_id: str, limit: int, active_besides) -> tuple[bool, int, int]:
        """Reserve an active-job slot for ``job_id``. ``active_besides(ids)``: the tenant's queued and
        running jobs in the store, not counting ``ids`` (this process's reservations, counted here
        as the snapshot ``ids``: a reservation released meanwhile, its row committed, is counted
        once either way). Returns (reserved, active in the store, reservations in flight here)."""
        lock = self._locks.setdefault(tenant, asyncio.Lock())
        async with lock:  # only reservations add to the set, and only under the lock
            mine = self._jobs.setdefault(tenant, set())
            ids = frozenset(mine)
            active = await active_besides(ids)
            if active + len(ids) >= limit:
                return False, active, len(ids)
            mine.add(job_id)
            return True, active, len(ids)

    def release_job(self, tenant: str, job_id: str) -> None:
        """After the job's row is committed (or the submit failed)."""
        self._jobs.get(tenant, set()).discard(job_id)


def tenant_limits(app) -> TenantLimits:
    """The app's TenantLimits (made on first use, and reported by its /metrics)."""
    limits = getattr(app.state, "tenant_limits", None)
    if limits is None:
        limits = app.state.tenant_limits = TenantLimits()
        metrics = getattr(app.state, "metrics", None)
        if metrics is not None:
            metrics.watch(limits)
    return limits

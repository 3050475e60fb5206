"""Request bodies that arrive too slowly, or are too large, on every route.

The header deadline (``service.connections``) ends once a request's headers are complete: a
client that then announces a body and sends a few bytes of it, or none, held its connection as
long as it liked (a form route waited for the body with no time limit), and enough of them held
every connection slot. Two parts here:

- ``Body``: a request body's chunks under the one rule every body arrives by: 408 when nothing
  arrives for ``CLCALIB_BODY_TIMEOUT_S``, when it arrives slower than
  ``CLCALIB_MIN_BODY_RATE_BYTES_S`` (once ``CLCALIB_BODY_RATE_GRACE_S`` have passed), and, for a
  small body, when it is not complete ``total_s`` after the headers. The upload parser
  (``service.uploads``) reads its stream through it, and so does:
- ``SmallBodies``: pure ASGI middleware that reads the whole body of every request but an upload
  (``STREAMED``) before the app sees it: at most ``CLCALIB_MAX_FORM_BYTES`` (413, from the
  Content-Length before anything is read, or as soon as the count passes it), complete within
  ``CLCALIB_BODY_TIMEOUT_S`` (408). Either answer closes the connection. The app then reads the
  body from memory. A request with neither Content-Length nor Transfer-Encoding has no body
  (HTTP/1.1) and passes through untouched.
"""

from __future__ import annotations

import asyncio
from collections import deque

from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import ApiError

# routes that read their own body as a stream, under their own cap (the job upload: up to
# CLCALIB_MAX_UPLOAD_BYTES, to disk, by the rate rule rather than a total deadline)
STREAMED = frozenset({("POST", "/v1/jobs")})

_END, _WAKE = object(), object()


class Body:
    """The request body's chunks, with the deadlines: ApiError 408 when nothing arrives for
    ``idle_s`` seconds; once ``grace_s`` seconds of the body have passed, when fewer than
    ``min_rate`` bytes a second arrived over the last ``window_s`` seconds (a client that sends a
    byte now and then never trips the first); and, when ``total_s`` is given, when the body is
    not complete ``total_s`` seconds after it began (a small body has no reason to take long,
    and with the rate check off a byte a minute would otherwise hold it for days). A reader
    task moves the chunks into a short queue and notes when each arrived; a timer checks the
    deadlines every tick, whether chunks come or not, and wakes ``next`` with the 408. Per chunk
    this costs a queue put and get, no task."""

    def __init__(self, request, idle_s: float, min_rate: float = 0.0, window_s: float = 10.0, grace_s: float = 10.0,
                 total_s: float | None = None):
        self.idle_s, self.min_rate, self.window_s, self.grace_s = idle_s, min_rate, window_s, grace_s
        self.total_s = total_s
        self._loop = asyncio.get_running_loop()
        self.start = self._last = self._loop.time()
        self.total = 0
        self._marks: deque[tuple[float, int]] = deque([(self.start, 0)])  # (arrival time, bytes by then)
        self._queue: asyncio.Queue = asyncio.Queue(maxsize=8)
        self._error: ApiError | None = None
        self._tick = max(0.05, min(1.0, idle_s / 4, window_s / 4 if min_rate > 0 else 1.0,
                                   total_s / 4 if total_s is not None else 1.0))
        self._reader = self._loop.create_task(self._read(request))
        self._timer = self._loop.call_later(self._tick, self._on_tick)

    async def _read(self, request) -> None:
        try:
            async for chunk in request.stream():
                if chunk:
                    self._last, self.total = self._loop.time(), self.total + len(chunk)
                    if self.min_rate > 0:
                        self._marks.append((self._last, self.total))
                    await self._queue.put(chunk)
            await self._queue.put(_END)
        except Exception as e:  # the client went away (ClientDisconnect), a broken stream
            await self._queue.put(e)

    def _on_tick(self) -> None:
        self._error = self._deadline_passed(self._loop.time())
        if self._error is None:
            self._timer = self._loop.call_later(self._tick, self._on_tick)
            return
        try:
            self._queue.put_nowait(_WAKE)
        except asyncio.QueueFull:  # next() is busy with chunks and sees the error at its next call
            pass

    def _deadline_passed(self, now: float) -> ApiError | None:
        if self.total_s is not None and now - self.start >= self.total_s:
            return ApiError(408, "body_timeout", f"the request body was not complete {self.total_s:.0f}s after its "
                            f"headers ({self.total} bytes arrived; CLCALIB_BODY_TIMEOUT_S); send the whole body "
                            "at once", headers={"Connection": "close"})
        if now - self._last >= self.idle_s:
            return ApiError(408, "body_timeout", f"the request body sent nothing for {self.idle_s:.0f}s "
                            "(CLCALIB_BODY_TIMEOUT_S); send the body without pauses", headers={"Connection": "close"})
        if self.min_rate <= 0 or now - self.start < self.grace_s:
            return None
        since = now - self.window_s
        while len(self._marks) > 1 and self._marks[1][0] <= since:
            self._marks.popleft()
        span = now - max(self.start, since)
        rate = (self.total - self._marks[0][1]) / span if span > 0 else float("inf")
        if rate >= self.min_rate:
            return None
        return ApiError(408, "body_too_slow", f"the request body arrived at {rate:.0f} bytes/s over the last "
                        f"{span:.0f}s, below the minimum of {self.min_rate:.0f} (CLCALIB_MIN_BODY_RATE_BYTES_S); "
                        "send the body from a faster connection", headers={"Connection": "close"})

    async def next(self) -> bytes | None:
        """The next chunk; None at the end of the body."""
        while True:
            if self._error is not None:
                raise self._error
            item = await self._queue.get()
            if item is _WAKE:
                continue
            if item is _END:
                return None
            if isinstance(item, Exception):
                raise item
            return item

    def close(self) -> None:
        self._timer.cancel()
        self._reader.cancel()


def form_too_large(cap: int) -> ApiError:
    return ApiError(413, "body_too_large", f"the request body is larger than {cap} bytes, the limit for a request "
                    "other than a job upload (CLCALIB_MAX_FORM_BYTES); send a smaller body",
                    headers={"Connection": "close"})


class SmallBodies:
    """Reads the body of every request but an upload (``STREAMED``) under ``Body``'s deadlines,
    capped at ``settings.max_form_bytes``, before the app sees it; 408/413 with the API's error
    body and Connection: close otherwise."""

    def __init__(self, app: ASGIApp, settings):
        self.app = app
        self.max_bytes = settings.max_form_bytes
        self.deadlines = dict(idle_s=settings.body_timeout_s, min_rate=settings.min_body_rate_bytes_s,
                              window_s=settings.body_rate_window_s, grace_s=settings.body_rate_grace_s,
                              total_s=settings.body_timeout_s)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"], scope["path"]) in STREAMED:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        length = headers.get("content-length")
        if (length is None and "transfer-encoding" not in headers) or length == "0":
            await self.app(scope, receive, send)  # no body to wait for
            return
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._refuse(form_too_large(self.max_bytes), scope, receive, send)  # before reading any of it
            return
        body = Body(Request(scope, receive), **self.deadlines)
        chunks: list[bytes] = []
        try:
            while (chunk := await body.next()) is not None:
                if body.total > self.max_bytes:  # a chunked body without a Content-Length
                    raise form_too_large(self.max_bytes)
                chunks.append(chunk)
        except ApiError as e:
            await self._refuse(e, scope, receive, send)
            return
        except ClientDisconnect:
            return  # nobody to answer
        finally:
            body.close()
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    @staticmethod
    async def _refuse(e: ApiError, scope: Scope, receive: Receive, send: Send) -> None:
        # Connection: close makes uvicorn close the connection after the answer: the rest of the
        # body is never read
        await JSONResponse(e.body(), status_code=e.status, headers=e.headers)(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the body read here, then the connection's own messages (the
    disconnect a streaming response waits for)."""
    given = False

    async def replayed() -> Message:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed

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

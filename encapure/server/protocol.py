"""uvicorn's HTTP/1.1 protocol with a header read timeout, and JSON where uvicorn would answer text.

uvicorn times out idle keep-alive connections but not a request whose headers trickle in: a
slowloris client (or 200 of them) kept its sockets open for good. The ASGI app cannot help, since
it is only called once the headers are complete, so the guard sits in the protocol: from the first
byte of a request (or from the connection's start) the client has ``header_timeout`` seconds to
finish its headers, else it gets a JSON 408 and the connection is closed. Body read timeouts are
the service middleware's (it sees the body arrive). uvicorn's own answer to unparseable HTTP is a
plain-text 400; ours is the JSON error body every other answer has.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import h11
import orjson
from uvicorn.protocols.http.h11_impl import H11Protocol

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _Fast
except ImportError:  # pragma: no cover - httptools is part of uvicorn[standard], which we install
    _Fast = None  # type: ignore[assignment,misc]

log = logging.getLogger("encapure.server.access")

_REASONS = {400: b"Bad Request", 408: b"Request Timeout"}


def raw_json_error(status: int, kind: str, message: str) -> bytes:
    """A complete HTTP/1.1 error answer that closes the connection, for the protocol level where
    no ASGI response object exists."""
    body = orjson.dumps({"error": {"type": kind, "message": message, "request_id": None}})
    head = (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
        % (status, _REASONS[status], len(body))
    )
    return head + body


class _HeaderGuard:
    """Mixed in before a uvicorn HTTP protocol class (which provides ``cycle`` and ``transport``)."""

    header_timeout: float = 10.0
    on_timeout: Callable[[], None] | None = None
    cycle: Any
    transport: asyncio.Transport
    # uvicorn's keep-alive timer, which the guard re-arms where uvicorn would not
    loop: asyncio.AbstractEventLoop
    timeout_keep_alive: int
    timeout_keep_alive_task: asyncio.TimerHandle | None
    timeout_keep_alive_handler: Callable[[], None]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._header_timer: asyncio.TimerHandle | None = None
        self._partial = False
        self._arm()

    def data_received(self, data: bytes) -> None:
        before = self.cycle
        idle = before is None or before.response_complete
        was = self._between() if idle else "idle"
        super().data_received(data)  # type: ignore[misc]
        if self.cycle is not before:  # a request's headers are complete
            self._disarm()
            self._partial = False
        elif idle and not self.transport.is_closing():
            now = self._between()
            if was == "body" and now == "idle":
                # The rest of a body answered before it was read (an overload 503, a 401, a 413 by
                # Content-Length) has all arrived: the connection is idle again. uvicorn stopped its
                # keep-alive timer when the bytes came; without it the socket would stay open.
                self._disarm()
                self._partial = False
                self._keep_alive()
            else:
                # "body": more of an answered request's body; the rest must arrive within the
                # timeout, else the connection closes without a word (the client has its answer).
                # Anything else (a new request's first bytes): its headers are due within the
                # timeout, else 408.
                self._partial = now != "body"
                if self._header_timer is None:
                    self._arm()

    def _between(self) -> str:
        """Once a response is complete, what the parser is in: "idle", "head" (a new request's
        headers) or "body" (the rest of the answered request's body)."""
        raise NotImplementedError

    def _keep_alive(self) -> None:
        if self.timeout_keep_alive_task is None:
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)  # type: ignore[misc]

    def send_400_response(self, msg: str) -> None:
        self.transport.write(raw_json_error(400, "invalid_request_error", f"malformed HTTP request: {msg}"))
        self.transport.close()

    def _arm(self) -> None:
        self._header_timer = asyncio.get_running_loop().call_later(self.header_timeout, self._expired)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _expired(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or not (self.cycle is None or self.cycle.response_complete):
            return
        if self._partial:  # a request was begun and not finished: say why it is refused
            self.transport.write(
                raw_json_error(
                    408,
                    "request_timeout",
                    f"the request headers did not arrive within {self.header_timeout:g} s (--header-timeout)",
                )
            )
            log.info("header timeout: connection closed", extra={"status": 408})
            if self.on_timeout is not None:
                self.on_timeout()
        self.transport.close()


class GuardedH11Protocol(_HeaderGuard, H11Protocol):
    def _between(self) -> str:
        their = self.conn.their_state
        if their is h11.SEND_BODY:
            return "body"
        if their is h11.IDLE and self.conn.trailing_data[0]:
            return "head"
        return "idle"


if _Fast is not None:

    class GuardedHttpToolsProtocol(_HeaderGuard, _Fast):
        # httptools reports where it is through callbacks; uvicorn's own ignore a body that comes
        # after the response, so the guard follows them here.
        _parsing = "idle"

        def on_message_begin(self) -> None:
            self._parsing = "head"
            super().on_message_begin()

        def on_headers_complete(self) -> None:
            self._parsing = "body"
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._parsing = "idle"
            super().on_message_complete()

        def _between(self) -> str:
            return self._parsing


def guarded_protocol(header_timeout_s: float, on_timeout: Callable[[], None] | None = None) -> type[asyncio.Protocol]:
    """The protocol class to give ``uvicorn.Config(http=...)``: httptools when installed (what
    uvicorn's "auto" picks), else h11, with this header timeout."""
    base: type[Any] = GuardedHttpToolsProtocol if _Fast is not None else GuardedH11Protocol
    return type(
        "EncapureHTTPProtocol",
        (base,),
        {"header_timeout": header_timeout_s, "on_timeout": staticmethod(on_timeout) if on_timeout else None},
    )

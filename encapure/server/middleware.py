"""One pure-ASGI middleware for what every request needs: request id, API key, body limit,
timing headers, HTTP metrics and the per-request log line.

Pure ASGI (not ``BaseHTTPMiddleware``) because it adds no task or stream per request, and because
it can refuse a body over the limit from its ``Content-Length`` or while it streams in, without
ever buffering more than the limit.
"""

from __future__ import annotations

import hmac
import logging
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from encapure.errors import AuthenticationError, InvalidInputError, PayloadTooLargeError
from encapure.server.errors import error_response
from encapure.server.logs import request_id_var, request_info_var
from encapure.server.state import ServerState

log = logging.getLogger("encapure.server.access")

# Probes and the API docs work without credentials; everything else needs the key when one is set.
OPEN_PATHS = frozenset({"/health", "/ready", "/ping", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
QUIET_PATHS = frozenset({"/health", "/ready", "/metrics"})


def _valid_request_id(raw: bytes) -> str | None:
    if not raw or len(raw) > 128:
        return None
    try:
        s = raw.decode("ascii")
    except UnicodeDecodeError:
        return None
    return s if s.isprintable() else None


class ServiceMiddleware:
    def __init__(self, app: ASGIApp, state: ServerState, routes: frozenset[str]) -> None:
        self.app = app
        self.state = state
        self.routes = routes
        # routes with a path parameter (/v1/models/{model_id}) are labelled by their template
        self.templates = [(r.split("{", 1)[0], r) for r in sorted(routes) if "{" in r]
        self.limit = state.settings.max_request_bytes
        key = state.settings.api_key
        self.expected_auth = f"Bearer {key}".encode() if key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        rid: str | None = None
        auth: bytes | None = None
        clen: bytes | None = None
        ctype_at = -1
        headers = scope["headers"]
        for n, (k, v) in enumerate(headers):
            if k == b"content-type":
                if b"json" not in v:
                    ctype_at = n
            elif k == b"x-request-id":
                rid = _valid_request_id(v)
            elif k == b"authorization":
                auth = v
            elif k == b"content-length":
                clen = v
        if rid is None:
            rid = uuid.uuid4().hex
        if ctype_at >= 0:
            # We only speak JSON: `curl -d` (form content type) or a missing type still means JSON.
            headers = list(headers)
            headers[ctype_at] = (b"content-type", b"application/json")
            scope["headers"] = headers
        token = request_id_var.set(rid)
        path: str = scope["path"]
        route = path if path in self.routes else self._template(path)
        info: dict[str, Any] = {}
        info_token = request_info_var.set(info)
        st = scope.setdefault("state", {})
        st["request_id"] = rid
        st["t0"] = t0
        st["deadline"] = time.monotonic() + self.state.settings.request_timeout_s
        st["info"] = info
        metrics = self.state.http_metrics
        metrics.in_flight.inc()
        status = 500
        started = False
        too_large = False
        received = 0
        rid_b = rid.encode()

        async def limited_receive() -> Message:
            nonlocal received, too_large
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > self.limit:
                    too_large = True
                    raise PayloadTooLargeError(self._too_large_message())
            return msg

        async def inner_send(msg: Message) -> None:
            nonlocal status, started
            if msg["type"] == "http.response.start":
                started = True
                status = msg["status"]
                headers = list(msg.get("headers", ()))
                headers.append((b"x-request-id", rid_b))
                headers.append((b"x-total-time", f"{(time.perf_counter() - t0) * 1000:.2f}".encode()))
                msg = {**msg, "headers": headers}
            await send(msg)

        async def send_wrapper(msg: Message) -> None:
            if too_large:
                # The app saw a failing body read (and may call it a 400): answer what really happened.
                if msg["type"] == "http.response.start" and not started:
                    await self._send_error(PayloadTooLargeError(self._too_large_message()), scope, inner_send)
                return
            await inner_send(msg)

        try:
            if (
                self.expected_auth is not None
                and path not in OPEN_PATHS
                and not (auth is not None and hmac.compare_digest(auth, self.expected_auth))
            ):
                why = "missing" if auth is None else "wrong"
                await self._send_error(
                    AuthenticationError(f"{why} API key: send 'Authorization: Bearer <key>'"),
                    scope,
                    send_wrapper,
                )
            elif clen is not None and not clen.isdigit():
                await self._send_error(InvalidInputError("invalid Content-Length"), scope, send_wrapper)
            elif clen is not None and int(clen) > self.limit:
                await self._send_error(PayloadTooLargeError(self._too_large_message()), scope, send_wrapper)
            else:
                await self.app(scope, limited_receive, send_wrapper)
        except Exception as exc:
            if started:
                log.error("error after the response started", exc_info=exc)
                raise
            await self._send_error(exc, scope, send_wrapper)
        finally:
            elapsed = time.perf_counter() - t0
            metrics.in_flight.dec()
            label = "499" if info.get("disconnected") else str(status)
            metrics.requests.labels(route, scope["method"], label).inc()
            metrics.latency.labels(route).observe(elapsed)
            if info.get("disconnected"):
                metrics.disconnects.labels(route).inc()
            level = logging.DEBUG if path in QUIET_PATHS else logging.INFO
            if log.isEnabledFor(level):
                log.log(
                    level,
                    "request",
                    extra={
                        "request_id": rid,
                        "method": scope["method"],
                        "route": path if route != "unmatched" else f"unmatched:{path[:100]}",
                        "status": int(label),
                        "total_ms": round(elapsed * 1000, 2),
                        **info,
                    },
                )
            request_id_var.reset(token)
            request_info_var.reset(info_token)

    def _template(self, path: str) -> str:
        for prefix, template in self.templates:
            if path.startswith(prefix) and len(path) > len(prefix):
                return template
        return "unmatched"

    def _too_large_message(self) -> str:
        return f"request body is larger than the server's limit of {self.limit} bytes (--max-request-bytes)"

    @staticmethod
    async def _send_error(exc: BaseException, scope: Scope, send: Send) -> None:
        async def no_receive() -> Message:  # pragma: no cover - error responses never read the body
            return {"type": "http.disconnect"}

        await error_response(exc)(scope, no_receive, send)

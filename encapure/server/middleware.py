"""Two pure-ASGI layers. ``ServiceMiddleware``, for what every request needs: request id, API
key, body limit and body read timeout, timing headers, HTTP metrics, the per-request log line, and
the JSON 503 of a request cut off by the end of a drain. Inside it (after auth), ``OverloadGate``:
while the scheduler is saturated, inference routes are refused before their body is read.

Pure ASGI (not ``BaseHTTPMiddleware``) because it adds no task or stream per request, and because
it can refuse a body over the limit from its ``Content-Length`` or while it streams in, without
ever buffering more than the limit.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import time
import uuid
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from encapure.errors import (
    AuthenticationError,
    CancelledRequestError,
    InvalidInputError,
    OverloadedError,
    PayloadTooLargeError,
    RequestTimeoutError,
    ShuttingDownError,
)
from encapure.scheduler.admission import MIN_REQUEST_WORK
from encapure.server.errors import error_body, error_response, to_encapure
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
        self.body_timeout = state.settings.body_timeout_s
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
        # A body read that failed for a reason of ours: the app calls any failed read a 400, so
        # send_wrapper answers what really happened instead.
        body_error: Exception | None = None
        body_done = False
        received = 0
        rid_b = rid.encode()
        body_deadline = t0 + self.body_timeout

        async def limited_receive() -> Message:
            nonlocal received, body_error, body_done
            if body_done:  # after the body only a disconnect can come: no deadline on that wait
                return await receive()
            try:
                msg = await asyncio.wait_for(receive(), max(0.0, body_deadline - time.perf_counter()))
            except asyncio.TimeoutError:
                body_error = RequestTimeoutError(
                    f"the request body did not arrive within {self.body_timeout:g} s (--body-timeout)"
                )
                raise body_error from None
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > self.limit:
                    body_error = PayloadTooLargeError(self._too_large_message())
                    raise body_error
                body_done = not msg.get("more_body", False)
            elif msg["type"] == "http.disconnect":
                info["disconnected"] = True  # a client that left mid-body is a 499, not our 400
                body_done = True
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
            if body_error is not None:
                if msg["type"] == "http.response.start" and not started:
                    await self._send_error(body_error, scope, inner_send)
                return
            await inner_send(msg)

        task = asyncio.current_task()
        if task is not None:
            self.state.http_tasks.add(task)

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
        except asyncio.CancelledError:
            # The end of a drain cuts off what is still running (DrainingServer): answer it with our
            # 503, not uvicorn's plain-text 500. Any other cancellation is not ours to swallow.
            if started or not self.state.cutting_off:
                raise
            if task is not None and hasattr(task, "uncancel"):
                task.uncancel()
            await self._send_error(
                ShuttingDownError(
                    "the server shut down before this request finished (--shutdown-timeout); retry on "
                    "another instance"
                ),
                scope,
                send_wrapper,
            )
        except Exception as exc:
            if started:
                log.error("error after the response started", exc_info=exc)
                raise
            await self._send_error(exc, scope, send_wrapper)
        finally:
            if task is not None:
                self.state.http_tasks.discard(task)
            elapsed = time.perf_counter() - t0
            metrics.in_flight.dec()
            gone = bool(info.get("disconnected"))
            label = "499" if gone else str(status)
            metrics.requests.labels(route, scope["method"], label).inc()
            metrics.latency.labels(route).observe(elapsed)
            if gone:
                metrics.disconnects.labels(route).inc()
                info["error"] = CancelledRequestError.kind
            if info.get("error"):
                metrics.errors.labels(info["error"]).inc()
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


class OverloadGate:
    """Refuses requests to the routes that go through admission, before reading their body, while
    the scheduler would refuse any request at once (``Scheduler.refuse_early``).

    Why: clients that ignore Retry-After and retry at once (a retry storm) sent hundreds of
    refusals a second, and each one read its body, parsed the JSON, built the pydantic model and
    estimated its size before admission said no: that CPU came out of inference (goodput fell to
    50-76% of the saturating throughput on 2 cores). Here a refusal is one call into the scheduler
    and a pre-serialized answer. The gate asks with the least work any request brings
    (``MIN_REQUEST_WORK``): ``Content-Length`` gives no honest lower bound on a request's work
    (whitespace, metadata that is never tokenized), and when the scheduler is saturated even the
    smallest request is refused, so the gate refuses exactly what the full path would refuse at
    once, and nothing it would admit or let wait. The unread body is discarded by uvicorn once the
    answer is sent; the connection stays open (see ``protocol._HeaderGuard``).
    """

    def __init__(self, app: ASGIApp, state: ServerState, routes: frozenset[str]) -> None:
        self.app = app
        self.state = state
        self.routes = routes  # the POST routes that go through the scheduler's admission
        err = OverloadedError(
            "the server is at capacity: the work it has admitted fills what it can finish in time; "
            "retry after the Retry-After seconds",
            retry_after=1.0,
        )
        self.error = to_encapure(err)  # the one error -> status mapping
        marker = "@request-id@"
        head, _, tail = error_body(self.error, marker).partition(orjson.dumps(marker))
        self.body_head, self.body_tail = head, tail

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in self.routes:
            sched = self.state.scheduler
            st = scope.get("state") or {}
            deadline = st.get("deadline")
            if sched is not None and deadline is not None:
                retry = sched.refuse_early(MIN_REQUEST_WORK, deadline)
                if retry is not None:
                    await self._refuse(st, retry, send)
                    return
        await self.app(scope, receive, send)

    async def _refuse(self, st: dict[str, Any], retry_after: float, send: Send) -> None:
        info = st.get("info")
        if info is not None:
            info["error"] = self.error.kind  # counted in encapure_http_errors_total and logged
        rid = st.get("request_id")
        body = self.body_head + orjson.dumps(rid) + self.body_tail
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", str(max(1, math.ceil(retry_after))).encode()),
        ]
        await send({"type": "http.response.start", "status": self.error.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

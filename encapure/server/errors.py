"""THE one place where errors become HTTP responses.

Everything that can go wrong — our ``EncapureError`` hierarchy, FastAPI's validation errors,
Starlette's 404/405, limits enforced by the middleware, unexpected exceptions — is first turned
into an ``EncapureError`` and then rendered from its ``status``/``kind``/``retry_after`` as
``{"error": {"type", "message", "request_id"}}`` (OpenAI's error object). No stack trace leaves.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from encapure.errors import (
    AuthenticationError,
    EncapureError,
    InvalidInputError,
    NotFoundError,
    PayloadTooLargeError,
    RequestTimeoutError,
)
from encapure.server.logs import request_id_var, request_info_var

log = logging.getLogger("encapure.server")


class MethodNotAllowedError(InvalidInputError):
    status = 405


class InternalError(EncapureError):
    """Something we did not foresee; the details go to the log, not to the client."""

    kind = "internal_error"
    status = 500


def _describe_validation(errors: list[Any]) -> str:
    parts = []
    for e in errors[:5]:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        where = ".".join(loc)
        if e.get("type") == "json_invalid":
            ctx = e.get("ctx") or {}
            parts.append(f"malformed JSON body: {ctx.get('error', e.get('msg'))}")
        elif e.get("type") == "missing" and not where:
            parts.append("a JSON request body is required")
        else:
            msg = str(e.get("msg"))
            given = e.get("input")
            if isinstance(given, (str, int, float)) and not isinstance(given, bool) and len(repr(given)) <= 60:
                msg += f" (got {given!r})"
            parts.append(f"{where}: {msg}" if where else msg)
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(parts) + more


def to_encapure(exc: BaseException) -> EncapureError:
    """Translate any exception into our hierarchy (unknown ones become a generic 500)."""
    if isinstance(exc, EncapureError):
        return exc
    if isinstance(exc, RequestValidationError):
        return InvalidInputError("invalid request: " + _describe_validation(list(exc.errors())))
    if isinstance(exc, StarletteHTTPException):
        if exc.status_code == 404:
            return NotFoundError("no such route; see /docs for the API")
        if exc.status_code == 405:
            return MethodNotAllowedError("method not allowed on this route; see /docs for the API")
        if exc.status_code == 413:
            return PayloadTooLargeError(str(exc.detail))
        if 400 <= exc.status_code < 500:
            err = InvalidInputError(str(exc.detail))
            err.status = exc.status_code
            return err
    return InternalError("internal server error; the request id identifies it in the server log")


def error_body(err: EncapureError, request_id: str | None) -> bytes:
    return orjson.dumps({"error": {"type": err.kind, "message": err.message, "request_id": request_id}})


def error_kinds() -> list[str]:
    """Every ``type`` an error body can carry (for zero-initialized metric series)."""
    kinds: set[str] = set()
    todo: list[type[EncapureError]] = [EncapureError]
    while todo:
        cls = todo.pop()
        kinds.add(cls.kind)
        todo.extend(cls.__subclasses__())
    return sorted(kinds)


def error_response(
    exc: BaseException, request_id: str | None = None, extra_headers: dict[str, str] | None = None
) -> Response:
    """Render any exception as our JSON error response (status, body and the headers its status
    calls for: Retry-After on 503, WWW-Authenticate on 401, Allow on 405, Connection: close on
    408)."""
    err = to_encapure(exc)
    rid = request_id if request_id is not None else request_id_var.get()
    info = request_info_var.get()
    if info is not None:
        info["error"] = err.kind
    if isinstance(err, InternalError) and not isinstance(exc, EncapureError):
        log.error("unhandled error", exc_info=exc)
    elif err.status >= 500 and err.status != 503:  # 503s are the server's state, not failures
        log.error("%s: %s", err.kind, err.message)
    headers = {}
    if err.retry_after is not None:
        headers["retry-after"] = str(max(1, math.ceil(err.retry_after)))
    if isinstance(err, AuthenticationError):
        headers["www-authenticate"] = "Bearer"
    elif isinstance(err, RequestTimeoutError):
        headers["connection"] = "close"  # the rest of this connection's bytes cannot be trusted
    if extra_headers:
        headers.update(extra_headers)
    return Response(
        error_body(err, rid), status_code=err.status, headers=headers, media_type="application/json"
    )


def leaf_routes(routes: list[Any]) -> list[Any]:
    out = []
    for r in routes:
        inner = getattr(r, "original_router", None)  # FastAPI keeps included routers as one entry
        out.extend(leaf_routes(list(inner.routes)) if inner is not None else [r])
    return out


def allowed_methods(app: Any, path: str) -> str:
    """Every method some route serves at this path (Starlette's own 405 names only the first
    route's, and ``GET /`` and ``POST /`` are two routes)."""
    methods: set[str] = set()
    for route in leaf_routes(list(app.router.routes)):
        regex = getattr(route, "path_regex", None)
        if regex is not None and regex.match(path) and getattr(route, "methods", None):
            methods.update(route.methods)
    return ", ".join(sorted(methods))


async def _handler(request: Request, exc: Exception) -> Response:
    if isinstance(exc, StarletteHTTPException) and exc.status_code == 405:
        return error_response(exc, extra_headers={"allow": allowed_methods(request.app, request.url.path)})
    return error_response(exc)


def install_error_handlers(app: FastAPI) -> None:
    for exc_type in (EncapureError, RequestValidationError, StarletteHTTPException):
        app.add_exception_handler(exc_type, _handler)

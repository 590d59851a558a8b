"""The FastAPI application: routes, the one error mapping, the service middleware, lifecycle."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from encapure import __version__
from encapure.server.errors import install_error_handlers, leaf_routes
from encapure.server.middleware import OPEN_PATHS, OverloadGate, ServiceMiddleware
from encapure.server.routes import router
from encapure.server.state import ServerState
from encapure.settings import Settings

DESCRIPTION = """Fast reranking and text embeddings on ONNX Runtime, with cross-request batching.

Every error is `{"error": {"type", "message", "request_id"}}`; 503 answers carry `Retry-After`.
"""


def create_app(settings: Settings | None = None, state: ServerState | None = None) -> FastAPI:
    """Build the app. Models load in the background once it starts; /ready says when it is done."""
    settings = settings or Settings()
    holder: dict[str, ServerState] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        st = holder["state"]
        st.start_loading()
        if st.ready_before_startup_ends:
            await st.wait_loaded()
        try:
            yield
        finally:
            await st.close()

    app = FastAPI(
        title="Encapure",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        strict_content_type=False,  # `curl -d` without a JSON content type is still JSON to us
    )
    app.include_router(router)
    install_error_handlers(app)
    st = state or ServerState(settings)
    holder["state"] = st
    app.state.encapure = st
    paths = frozenset(
        [getattr(r, "path", "") for r in [*app.routes, *router.routes]]
        + ["/openapi.json", "/docs", "/redoc", "/docs/oauth2-redirect"]
    )
    # Inside the service middleware (after auth, inside metrics and the log line): the routes that
    # go through admission are refused unread while the scheduler is saturated.
    admitted = frozenset(
        r.path for r in leaf_routes(list(router.routes)) if "POST" in (getattr(r, "methods", None) or ())
    )
    app.add_middleware(OverloadGate, state=st, routes=admitted)
    app.add_middleware(ServiceMiddleware, state=st, routes=paths)
    app.openapi = lambda: _openapi(app, st)  # type: ignore[method-assign]
    return app


# --- the OpenAPI document: what each route really answers --------------------------------------------
_ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
_WHY = {
    400: "Invalid request (malformed JSON, a field out of range, a lone surrogate in a string, a model "
    "of another task)",
    401: "Missing or wrong API key (`Authorization: Bearer <key>`)",
    404: "No such model (or no such route)",
    408: "The request body did not arrive within --body-timeout; the connection is closed",
    413: "Body over --max-request-bytes, or more inputs than --max-client-batch-size",
    500: "A failure of ours (the request id identifies it in the server log)",
    503: "Overloaded, deadline exceeded, not ready, shutting down, or a dead worker; see `Retry-After`",
}
# What can go wrong where, beyond the 500 any route may answer. Routes that read a body can time
# out on it and be too large; inference routes can also name an unknown model or be refused.
_INFERENCE = (400, 404, 408, 413, 503)
_STATUSES: dict[tuple[str, str], tuple[int, ...]] = {
    ("get", "/health"): (503,),
    ("head", "/health"): (503,),
    ("get", "/ready"): (503,),
    ("head", "/ready"): (503,),
    ("get", "/ping"): (503,),
    ("head", "/ping"): (503,),
    ("get", "/v1/models/{model_id}"): (404,),
}


# Which tasks a route needs a model for; routes not listed answer whatever is loaded.
_TASKS: dict[str, set[str]] = {
    "/rerank": {"rerank"},
    "/v1/rerank": {"rerank"},
    "/v2/rerank": {"rerank"},
    "/v1/embeddings": {"embed"},
    "/embeddings": {"embed"},
    "/embed": {"embed"},
    "/similarity": {"embed"},
    "/predict": {"classify", "rerank"},
}
_TOKEN_OUTPUTS = ("multi_vector", "token_embeddings")
_ROOT_BODIES = {  # the request shapes POST / and /invocations dispatch, by the task they need
    "RerankRequest": "rerank",
    "TEIPredictRequest": "classify|rerank",
    "TEIEmbedRequest": "embed",
    "TEISimilarityRequest": "embed",
    "OpenAIEmbeddingsRequest": "embed",
}


def _openapi(app: FastAPI, state: ServerState) -> dict[str, Any]:
    """FastAPI's document, made truthful: no 422 (validation errors are our 400), every error
    status a route can answer with the error schema and its headers, bearer auth when a key is
    set (the probes and docs stay open), HEAD for the probes. Once the models are loaded it
    describes this server: routes of tasks no loaded model does are left out (they only answer
    400), and token ids are bounded by the vocabulary."""
    if app.openapi_schema:
        return app.openapi_schema
    settings = state.settings
    doc = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    ready = state.phase == "ready" and bool(state.models)
    if ready:
        _describe_served(doc, state)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    from encapure.server.schemas import ErrorResponse

    error_schema = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(error_schema.pop("$defs", {}))
    schemas["ErrorResponse"] = error_schema
    secured = settings.api_key is not None
    if secured:
        doc["components"]["securitySchemes"] = {"bearerAuth": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"bearerAuth": []}]
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            statuses = set(_STATUSES.get((method, path), _INFERENCE if method == "post" else ()))
            statuses.add(500)
            if secured and path not in OPEN_PATHS:
                statuses.add(401)
            elif secured:
                op["security"] = []
            for status in sorted(statuses):
                entry: dict[str, Any] = {
                    "description": _WHY[status],
                    "content": {"application/json": {"schema": _ERROR_REF}},
                }
                if status == 503:
                    entry["headers"] = {"Retry-After": {"description": "seconds", "schema": {"type": "integer"}}}
                elif status == 401:
                    entry["headers"] = {"WWW-Authenticate": {"schema": {"type": "string", "enum": ["Bearer"]}}}
                responses[str(status)] = entry
    if ready:  # before, the document is the generic one and is made again on the next request
        app.openapi_schema = doc
    return doc


def _describe_served(doc: dict[str, Any], state: ServerState) -> None:
    tasks = {m.task for m in state.models.values()}
    for path in [p for p, need in _TASKS.items() if not need & tasks]:
        doc["paths"].pop(path, None)
    if not any(m.manifest.output_kind in _TOKEN_OUTPUTS for m in state.models.values()):
        for path in ("/embed_all", "/embed_multivector"):  # only models with token outputs answer them
            doc["paths"].pop(path, None)
    for path in ("/", "/invocations"):
        body = doc["paths"].get(path, {}).get("post", {}).get("requestBody")
        if body is None:
            continue
        schema = body["content"]["application/json"]["schema"]
        schema["anyOf"] = [
            ref for ref in schema["anyOf"]
            if set(_ROOT_BODIES[ref["$ref"].rsplit("/", 1)[1]].split("|")) & tasks
        ]
    vocab = min(int(m.vocab_size) for m in state.models.values())
    decode = doc.get("components", {}).get("schemas", {}).get("TEIDecodeRequest")
    if decode is not None:
        _bound_ids(decode["properties"]["ids"], vocab - 1)


def _bound_ids(schema: Any, maximum: int) -> None:
    """Every integer in a token-id schema gets the vocabulary's last id as its maximum."""
    if isinstance(schema, dict):
        if schema.get("type") == "integer":
            schema["maximum"] = maximum
        for value in schema.values():
            _bound_ids(value, maximum)
    elif isinstance(schema, list):
        for value in schema:
            _bound_ids(value, maximum)

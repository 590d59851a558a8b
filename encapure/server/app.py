"""The FastAPI application: routes, the one error mapping, the service middleware, lifecycle."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from encapure import __version__
from encapure.server.errors import install_error_handlers
from encapure.server.middleware import ServiceMiddleware
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
    app.add_middleware(ServiceMiddleware, state=st, routes=paths)
    return app

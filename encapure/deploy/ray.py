"""Scale-out on Ray Serve: the same HTTP service as ``encapure serve``, one engine per replica.

    serve run encapure.deploy.ray:build_app model=/models/rr-int8 num_replicas=2
    serve run encapure.deploy.ray:build_app model=/models/rr-int8 min_replicas=1 max_replicas=8

or from Python: ``serve.run(build_app({"model": "/models/rr-int8", "num_replicas": 2}))``.

Each replica builds our own FastAPI app (``create_app``) with its own ``ServerState``: one loaded
model set and one scheduler, so requests routed to a replica are batched across each other there,
exactly as in ``encapure serve``; the routes, shapes and error bodies are the same because they are
the same code. A replica stopped by Ray (scale-down, redeploy) gets no new requests and finishes
its ongoing ones (``graceful_shutdown_timeout_s``) before the app's lifespan closes the scheduler. Ray Serve does the routing between replicas, the HTTP proxy and the autoscaling (by
ongoing requests per replica); nothing here is cluster code of ours.

Why the app is built in the replica (``serve.ingress()`` without an app, late-bound through
``__serve_build_asgi_app__``) rather than passed in: our app owns per-process state (loaded models,
worker threads, a Prometheus registry) that cannot be pickled and must not be shared. The models
are loaded in the replica's constructor, so a replica only counts as started once its engine is
loaded; the scheduler is then started and warmed by the app's own lifespan (milliseconds), and a
request that arrives in that moment gets our usual 503 with ``Retry-After``.

A replica that dies (killed, out of memory) takes its in-flight requests with it, and Ray's proxy
answers those 500 without retrying. :func:`proxy_middlewares` adds a proxy middleware that replays
such a request up to twice (to a live replica: the router has marked the dead one) and, if every
try is lost, answers our 503 with ``Retry-After``. Reranking and embedding are pure, so a retry is
safe. Enable it where the proxies start (every node of the cluster)::

    RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=encapure.deploy.ray:proxy_middlewares serve run ...

``args`` (strings from ``serve run k=v``, or typed values from Python): the deployment options of
:class:`RayArgs` and any ``Settings`` field (``model``, ``precision``, ``workers``,
``max_batch_tokens``, ...). Fields not given come from the replicas' ``ENCAPURE_*`` environment.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from encapure.settings import Settings

try:
    from ray import serve
    from ray.serve import Application
except ImportError as e:  # pragma: no cover - exercised where ray is absent
    raise ImportError("encapure.deploy.ray needs Ray Serve: pip install 'encapure[ray]'") from e

REPLICA_HEADER = "x-encapure-replica"
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "encapure.deploy.ray:proxy_middlewares"


class RayArgs(BaseModel):
    """Deployment options; everything else in ``args`` is a ``Settings`` field."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="encapure", min_length=1, description="Ray Serve deployment name")
    # A fixed count, or None for autoscaling between min_replicas and max_replicas.
    num_replicas: int | None = Field(default=None, ge=1)
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=4, ge=1)
    # Autoscaling target: requests in flight per replica. Our scheduler batches across requests,
    # so a replica wants several at once; 16 keeps batches full without long queues on 1-2 cores.
    target_ongoing_requests: float = Field(default=16.0, gt=0)
    # Ray's default (5) would starve the cross-request batcher; admission (503) stays ours.
    max_ongoing_requests: int = Field(default=128, ge=1)
    num_cpus: float = Field(default=1.0, gt=0, description="CPUs reserved per replica")
    # Seconds Ray waits for a stopping replica; our drain gets this too (shutdown_timeout_s).
    graceful_shutdown_timeout_s: float = Field(default=30.0, ge=0)

    @model_validator(mode="after")
    def _bounds(self) -> RayArgs:
        if self.num_replicas is None and self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        return self


def split_args(args: dict[str, Any]) -> tuple[RayArgs, dict[str, Any]]:
    """``args`` -> (deployment options, settings fields); unknown names fail here, on the driver."""
    deploy_keys = set(RayArgs.model_fields)
    settings_keys = set(Settings.model_fields)
    unknown = sorted(k for k in args if k not in deploy_keys and k not in settings_keys)
    if unknown:
        raise ValueError(
            f"unknown argument(s) {', '.join(unknown)}: expected deployment options "
            f"({', '.join(sorted(deploy_keys))}) or encapure settings ({', '.join(sorted(settings_keys))})"
        )
    options = RayArgs(**{k: v for k, v in args.items() if k in deploy_keys})
    fields = {k: v for k, v in args.items() if k in settings_keys}
    fields.setdefault("shutdown_timeout_s", options.graceful_shutdown_timeout_s)
    Settings(**fields)  # a bad value fails now with the setting's name, not later in every replica
    return options, fields


@serve.ingress()
class EncapureReplica:
    """One Ray Serve replica: our FastAPI app over one engine and one scheduler."""

    # Ray Serve awaits an async constructor (the ingress wrapper's own __init__ is async).
    async def __init__(self, fields: dict[str, Any]) -> None:  # type: ignore[misc]
        from encapure.server.loading import load_spec, parse_specs
        from encapure.server.logs import setup_logging

        self.settings = Settings(**fields)
        setup_logging(self.settings.log_format, self.settings.log_level)
        loaded = [await asyncio.to_thread(load_spec, spec, self.settings) for spec in parse_specs(self.settings)]
        self.models = {spec.name: model for spec, model, _ in loaded}
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside a replica (unit use): the pid still tells processes apart
            self.replica_id = f"pid-{os.getpid()}"
        self.state: Any = None

    def __serve_build_asgi_app__(self) -> Any:
        from encapure.server.app import create_app
        from encapure.server.state import ServerState

        self.state = ServerState(self.settings, models=self.models)
        # Ray sends traffic to a replica once its ASGI start-up is over: make that mean ready
        # (scheduler started, warm-up done), or the first requests of a new replica get 503s.
        self.state.ready_before_startup_ends = True
        app = create_app(self.settings, self.state)
        replica_id = self.replica_id

        @app.middleware("http")
        async def _name_replica(request: Any, call_next: Any) -> Any:
            # Which replica answered: for debugging routing and for the scale-out test.
            response = await call_next(request)
            response.headers[REPLICA_HEADER] = replica_id
            return response

        return app

    async def check_health(self) -> None:
        """Ray restarts a replica whose engine failed to start or whose workers died."""
        state = self.state
        if state is None:
            return
        if state.phase == "failed":
            raise RuntimeError("encapure: models failed to load")
        if state.phase == "ready" and state.scheduler is not None and not state.scheduler.is_healthy():
            raise RuntimeError("encapure: an inference worker died")


class RetryLostRequests:
    """Ray proxy middleware (pure ASGI): retry a request whose replica was lost, else a clear 503.

    Our app answers every error as JSON; a 5xx without a JSON body, or no response at all (what
    Ray's proxy sends when the replica died: uvicorn then writes a bare 500), comes from Ray itself. Such a request is replayed from its buffered body up
    to ``retries`` times, ``backoff_s`` apart; if every try is lost the client gets our 503 with
    ``Retry-After`` instead of Ray's text 500. Bodies above ``max_buffer_bytes`` pass through
    untouched (our server refuses them anyway, 413).
    """

    def __init__(self, app: Any, retries: int = 2, backoff_s: float = 0.2,
                 max_buffer_bytes: int = 16 * 1024 * 1024) -> None:
        self.app = app
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_buffer_bytes = max_buffer_bytes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_buffer_bytes:
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(self.backoff_s)
            if await self._try(scope, body, receive, send):
                return
        from encapure.errors import UnavailableError
        from encapure.server.errors import error_response

        lost = UnavailableError("the replica serving this request was lost; retry", retry_after=1.0)
        await error_response(lost, request_id=None)(scope, receive, send)

    async def _try(self, scope: Any, body: bytes, receive: Any, send: Any) -> bool:
        """Run the request once; False (nothing sent to the client) when Ray lost it.

        The response is held until its last body message has arrived, then sent: a replica killed
        between sending the response start and its body (Ray's proxy passes them on as they come)
        had already given the client the headers, so the request could not be retried and the
        client saw the connection close mid-answer ("peer closed connection without sending
        complete message body", the flaky case of the two-replica test). Our app's answers are one
        start and one body message, so holding them costs no latency.
        """
        replayed = False
        lost = False
        complete = False
        held: list[Any] = []

        async def replay() -> Any:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later reads only wait for the client to disconnect

        async def guarded_send(message: Any) -> None:
            nonlocal lost, complete
            if lost:
                return
            if complete:
                await send(message)
                return
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers") or [])
                is_json = headers.get(b"content-type", b"").startswith(b"application/json")
                if message["status"] >= 500 and not is_json:
                    lost = True
                    return
            held.append(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                complete = True
                for m in held:
                    await send(m)
                held.clear()

        try:
            await self.app(scope, replay, guarded_send)
        except Exception:
            if complete:
                raise
            return False
        # Ray's proxy answers a lost replica's 500 by sending nothing (uvicorn then writes a bare
        # 500 outside of us): no complete response means lost too.
        return complete and not lost


def proxy_middlewares() -> list[Any]:
    """The callback named by ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``: Ray's proxy calls it."""
    from starlette.middleware import Middleware

    return [Middleware(RetryLostRequests)]


def build_app(args: dict[str, Any]) -> Application:
    """The application builder of ``serve run encapure.deploy.ray:build_app k=v ...``."""
    options, fields = split_args(dict(args))
    deployment_options: dict[str, Any] = {
        "name": options.name,
        "max_ongoing_requests": options.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": options.num_cpus},
        "graceful_shutdown_timeout_s": options.graceful_shutdown_timeout_s,
        # Loading a model (or exporting one on first use) takes longer than Ray's default patience.
        "health_check_timeout_s": 60.0,
    }
    if options.num_replicas is not None:
        deployment_options["num_replicas"] = options.num_replicas
    else:
        deployment_options["autoscaling_config"] = {
            "min_replicas": options.min_replicas,
            "max_replicas": options.max_replicas,
            "target_ongoing_requests": options.target_ongoing_requests,
        }
    deployment = serve.deployment(**deployment_options)(EncapureReplica)
    return deployment.bind(fields)

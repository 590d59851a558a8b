"""Operations: the probes (``/ping``, ``/health``, ``/ready``), ``/info``, ``/metrics``, and the served
models in OpenAI's shape (``/v1/models``, ``/models``, ``/v1/models/{id}``). None runs inference."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import PlainTextResponse, Response

from encapure import __version__
from encapure.engine.types import InferenceModel
from encapure.errors import ModelNotFoundError, UnavailableError
from encapure.server.errors import error_response
from encapure.server.routes.common import _json, _state, family_router
from encapure.server.schemas import HealthResponse, InfoResponse, ModelCard, ModelList, ReadyResponse
from encapure.server.state import ServerState

router = family_router()


# --- operations -----------------------------------------------------------------------------------
# Probes answer HEAD too: load balancers and some orchestrators probe with it.
_READY: dict[int | str, dict[str, Any]] = {200: {"model": ReadyResponse}}
_HEALTH: dict[int | str, dict[str, Any]] = {200: {"model": HealthResponse}}
_PING_DOC = "Readiness (SageMaker's and TEI's ping)"
_HEALTH_DOC = "Liveness: the inference workers are alive"
_READY_DOC = "Readiness: models loaded and warmed, not draining"

@router.get("/ping", responses=_READY, summary=_PING_DOC)
@router.head("/ping", responses=_READY, summary=_PING_DOC)
async def ping(request: Request) -> Response:
    return await ready(request)


@router.get("/health", responses=_HEALTH, summary=_HEALTH_DOC)
@router.head("/health", responses=_HEALTH, summary=_HEALTH_DOC)
async def health(request: Request) -> Response:
    state = _state(request)
    if state.phase == "failed":
        return error_response(UnavailableError("model loading failed; see the server log", retry_after=None))
    sched = state.scheduler
    if sched is not None and not sched.is_healthy():
        return error_response(
            UnavailableError("an inference worker died; restart the server", retry_after=None)
        )
    return _json({"status": "ok" if sched is not None else "starting", "phase": state.phase})


@router.get("/ready", responses=_READY, summary=_READY_DOC)
@router.head("/ready", responses=_READY, summary=_READY_DOC)
async def ready(request: Request) -> Response:
    state = _state(request)
    sched = state.require_scheduler()
    if not sched.is_accepting() or not sched.is_healthy():
        raise UnavailableError("the scheduler is not accepting work", retry_after=1.0)
    return _json({"status": "ready", "models": list(state.models)})


_DTYPES = {"fp32": "float32", "fp16": "float16"}


def _tei_model_type(model: InferenceModel) -> dict[str, Any]:
    """TEI's ``model_type``: ``{"embedding": {"pooling"}}``, ``{"reranker"|"classifier": {"id2label",
    "label2id"}}``."""
    man = model.manifest
    if model.task == "embed":
        return {"embedding": {"pooling": man.pooling or "mean"}}
    labels = list(man.labels or ["LABEL_0"])
    kind = "reranker" if model.task == "rerank" else "classifier"
    return {kind: {"id2label": {str(i): lab for i, lab in enumerate(labels)},
                   "label2id": {lab: i for i, lab in enumerate(labels)}}}


@router.get("/info", responses={200: {"model": InfoResponse}}, summary="Models, limits and version (TEI's Info fields first)")
async def info(request: Request) -> Response:
    state = _state(request)
    s = state.settings
    models = []
    for n, m in state.models.items():
        man = m.manifest
        models.append(
            {
                "name": n,
                "task": m.task,
                "precision": man.precision,
                "max_length": m.max_length,
                "source": state.specs[n].source if n in state.specs else man.source,
                "architecture": man.architecture,
                "embedding_dim": man.embedding_dim,
                "labels": man.labels,
                "load_seconds": round(state.load_seconds.get(n, 0.0), 3),
            }
        )
    first = next(iter(state.models.items()), None)
    tei: dict[str, Any] = {}
    if first is not None:
        n, m = first
        tei = {
            "model_id": n,
            "model_sha": None,
            "model_dtype": _DTYPES.get(m.manifest.precision, m.manifest.precision),
            "model_type": _tei_model_type(m),
            "max_input_length": m.max_length,
        }
    return _json(
        {
            # TEI's Info fields (of the first model; TEI serves one), then ours
            "model_id": None,
            **tei,
            "max_concurrent_requests": s.max_concurrent_requests,
            "max_batch_tokens": s.max_batch_tokens,
            "max_batch_requests": None,
            "max_client_batch_size": s.max_client_batch_size,
            "auto_truncate": True,
            "tokenization_workers": 1,
            "sha": None,
            "docker_label": None,
            "version": __version__,
            "phase": state.phase,
            "models": models,
            "startup_seconds": state.ready_after_s,
            "limits": {
                "max_batch_tokens": s.max_batch_tokens,
                "max_batch_size": s.max_batch_size,
                "max_wait_ms": s.max_wait_ms,
                "workers": s.workers,
                "threads_per_worker": s.resolved_threads(),
                "max_concurrent_requests": s.max_concurrent_requests,
                "max_queued_items": s.max_queued_items,
                "max_units_per_request": s.max_units_per_request,
                "max_tokenize_tokens": s.max_tokenize_tokens,
                "admission_timeout_s": s.admission_timeout_s,
                "request_timeout_s": s.request_timeout_s,
                "max_request_bytes": s.max_request_bytes,
                "max_client_batch_size": s.max_client_batch_size,
                "shutdown_timeout_s": s.shutdown_timeout_s,
                "header_timeout_s": s.header_timeout_s,
                "body_timeout_s": s.body_timeout_s,
            },
            "scheduler": state.scheduler.stats() if state.scheduler is not None else None,
        }
    )


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    summary="Prometheus metrics (text exposition format)",
)
async def metrics(request: Request) -> Response:
    return Response(generate_latest(_state(request).registry), media_type=CONTENT_TYPE_LATEST)


# --- served models (OpenAI shape) --------------------------------------------------------------
_CAPABILITIES = {"rerank": ["rerank"], "embed": ["embed"], "classify": ["classify"]}


def _model_card(state: ServerState, name: str, model: InferenceModel, owned_by: str = "encapure") -> dict[str, Any]:
    """OpenAI's model object plus Infinity's extra fields (``backend``, ``capabilities``, ``stats``).

    The extras are additive for OpenAI clients, and Infinity's generated client cannot parse a card
    without them."""
    return {"id": name, "object": "model", "created": int(state.started_at), "owned_by": owned_by,
            "task": model.task, "aliases": sorted(a for a, n in state.aliases.items() if n == name),
            "backend": state.settings.backend, "capabilities": _CAPABILITIES.get(model.task, [model.task]),
            "stats": {}}


@router.get("/v1/models", responses={200: {"model": ModelList}}, summary="Served models (OpenAI shape)")
async def list_models(request: Request) -> Response:
    state = _state(request)
    return _json({"object": "list", "data": [_model_card(state, n, m) for n, m in state.models.items()]})


@router.get("/models", responses={200: {"model": ModelList}}, summary="Served models (Infinity's path and shape: OpenAI's, owned_by \"infinity\")")
async def list_models_infinity(request: Request) -> Response:
    """Infinity serves this path and its client accepts only ``owned_by: "infinity"`` (an enum);
    OpenAI clients read the field as free text, so both work here."""
    state = _state(request)
    return _json({"object": "list",
                  "data": [_model_card(state, n, m, owned_by="infinity") for n, m in state.models.items()]})


@router.get("/v1/models/{model_id:path}", responses={200: {"model": ModelCard}}, summary="One served model (OpenAI shape)")
async def get_model(model_id: str, request: Request) -> Response:
    """Metadata of a model by its exact name: unlike inference, no other model stands in for it."""
    state = _state(request)
    name = state.resolve(model_id)
    model = state.models.get(name)
    if model is None:
        raise ModelNotFoundError(f"model {model_id!r} is not served here; loaded: {', '.join(state.models)}")
    return _json(_model_card(state, name, model))

"""``POST /`` (TEI, ``huggingface_hub.InferenceClient``) and ``/invocations`` (SageMaker): one route that
dispatches to a family's handler by the request's shape and the models' tasks; and ``GET /``."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from fastapi import Request
from pydantic import BaseModel
from starlette.responses import Response

from encapure import __version__
from encapure.errors import InvalidInputError
from encapure.server.routes.common import _json, _state, _validate, family_router
from encapure.server.routes.embed import embeddings, tei_embed, tei_similarity
from encapure.server.routes.predict import _hub_classification, tei_predict
from encapure.server.routes.rerank import rerank
from encapure.server.schemas import (
    OpenAIEmbeddingsRequest,
    RerankRequest,
    RootAnswer,
    ServiceInfo,
    TEIEmbedRequest,
    TEIPredictRequest,
    TEISimilarityRequest,
    describe_keys,
)
from encapure.server.state import ServerState

router = family_router()


# --- the root: TEI's and SageMaker's one inference route ------------------------------------------
def _root_route(state: ServerState, data: dict[str, Any]) -> str:
    """Which route a request to ``POST /`` means, from its shape and the models' tasks: TEI serves
    one model and answers by its task; with several, the request's shape (and ``model``) decides."""
    if "query" in data and ("texts" in data or "documents" in data):
        return "/rerank"
    served = {m.task for m in state.models.values()}
    if "input" in data and ("inputs" not in data or "embed" in served):
        return "/v1/embeddings"
    inputs = data.get("inputs")
    if isinstance(inputs, dict) and "source_sentence" in inputs:
        return "/similarity"
    if "inputs" not in data:
        raise InvalidInputError(
            "POST / takes a TEI request: {'inputs': ...} (embed or predict), {'query', 'texts'} (rerank) "
            "or {'inputs': {'source_sentence', 'sentences'}} (similarity); got keys: " + describe_keys(data)
        )
    named = state.models.get(state.resolve(data["model"])) if isinstance(data.get("model"), str) else None
    tasks = {named.task} if named is not None else {m.task for m in state.models.values()}
    pairs = isinstance(inputs, list) and bool(inputs) and isinstance(inputs[0], list) and all(
        isinstance(x, str) for x in inputs[0]
    )
    if "embed" in tasks and not pairs and ("parameters" not in data or tasks == {"embed"}):
        return "/embed"
    return "/predict"


_ROOT_HANDLERS: dict[str, tuple[type[BaseModel], Callable[[Any, Request], Any]]] = {
    "/rerank": (RerankRequest, rerank),
    "/v1/embeddings": (OpenAIEmbeddingsRequest, embeddings),
    "/embed": (TEIEmbedRequest, tei_embed),
    "/predict": (TEIPredictRequest, tei_predict),
    "/similarity": (TEISimilarityRequest, tei_similarity),
}


_ROOT_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"anyOf": [
            {"$ref": f"#/components/schemas/{n}"}
            for n in ("RerankRequest", "TEIEmbedRequest", "TEIPredictRequest", "TEISimilarityRequest",
                      "OpenAIEmbeddingsRequest")
        ]}}},
    }
}


@router.post("/", responses={200: {"model": RootAnswer}}, summary="Inference by the model's task and the request's shape (TEI)", openapi_extra=_ROOT_BODY)
@router.post(
    "/invocations", responses={200: {"model": RootAnswer}}, summary="Inference by the model's task and the request's shape (SageMaker)",
    openapi_extra=_ROOT_BODY,
)
async def root_inference(request: Request) -> Response:
    """``huggingface_hub.InferenceClient(base_url=...)`` and SageMaker post here. The body is
    validated by the schema of the route it is dispatched to, and answered as that route answers."""
    try:
        data = await request.json()  # StrictJSONRequest: orjson, lone surrogates refused
    except json.JSONDecodeError as e:
        raise InvalidInputError(f"invalid request: malformed JSON body: {e.msg}") from None
    if not isinstance(data, dict):
        raise InvalidInputError("invalid request: the body must be a JSON object")
    state = _state(request)
    state.require_scheduler()
    route = _root_route(state, data)
    request.scope["state"]["info"]["dispatched_to"] = route
    if route == "/predict" and "parameters" in data:
        return await _hub_classification(data, request)
    schema, handler = _ROOT_HANDLERS[route]
    response: Response = await handler(_validate(schema, data), request)
    return response


@router.get("/", responses={200: {"model": ServiceInfo}}, summary="Service name, version, models and where the docs are")
async def root_info(request: Request) -> Response:
    state = _state(request)
    return _json({"name": "encapure", "version": __version__, "phase": state.phase, "docs": "/docs",
                  "models": {n: m.task for n, m in state.models.items()}})

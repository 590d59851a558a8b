"""Per-token vectors: TEI's ``/embed_all`` and the native ``/embed_multivector``.

ColBERT models give their projected, normalized query or document vectors (what ``maxsim`` scores);
other embedding models exported by Encapure give the last hidden state's rows. Models without a
token-level output (cross-encoders, classifiers, third-party pooled ONNX files) are a 400.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any, Literal

from fastapi import Request
from starlette.responses import Response

from encapure.engine.types import InferenceModel, MultiVectorOutput, Prepared, Side
from encapure.errors import InvalidInputError
from encapure.server.routes.common import (
    _check_batch,
    _clip,
    _json,
    _model_side,
    _side,
    _specials,
    _state,
    _tokens,
    estimate_for_texts,
    family_router,
    pick_model,
    run_inference,
)
from encapure.server.routes.embed import _decode_ids, _prompt_kind
from encapure.server.schemas import (
    EmbedAllAnswer,
    MultiVectorRequest,
    MultiVectorResponse,
    TEIEmbedAllRequest,
)
from encapure.server.state import ServerState

router = family_router()

_TOKEN_KINDS = ("multi_vector", "token_embeddings")


def _pick(state: ServerState, name: str | None, route: str) -> tuple[str, InferenceModel]:
    """The named model, else the first one with token outputs (a ColBERT model or an embedder)."""
    if not name:
        for n, m in state.models.items():
            if m.task in ("embed", "rerank") and m.manifest.output_kind in _TOKEN_KINDS:
                return n, m
    return pick_model(state, name, ("embed", "rerank"), route)


def _prepare(model: InferenceModel, texts: list[str], *, kind: Any, truncate: bool,
             side: Side | None) -> Prepared:
    if side is not None and side != _model_side(model) and truncate and texts:
        room_of = getattr(model, "text_room", None)
        room = room_of(kind) if room_of is not None else model.max_length - _specials(model, pair=False)
        texts = _clip(model, texts, [room] * len(texts), side)
    return model.prepare_multivector(texts, kind=kind, truncate=truncate)


async def _multivector(
    request: Request,
    model_name: str | None,
    inputs: Any,
    *,
    route: str,
    kind: Literal["query", "document"] | None,
    truncate: bool,
    side: Side | None = None,
    prompt_name: str | None = None,
) -> tuple[str, InferenceModel, MultiVectorOutput, dict[str, str]]:
    state = _state(request)
    name, model = _pick(state, model_name, route)
    colbert = model.manifest.output_kind == "multi_vector"
    if prompt_name is not None:
        kind = _prompt_kind(name, model, prompt_name)
    if colbert and kind is None and route == "/embed_all":
        kind = "document"  # TEI's request has no kind; documents are what gets stored
    texts: list[str]
    if isinstance(inputs, str):
        texts = [inputs]
    elif inputs and isinstance(inputs[0], int):
        texts = await asyncio.to_thread(_decode_ids, model, [inputs])
    else:
        items = list(inputs)
        _check_batch(state, len(items), "inputs")
        id_at = [i for i, x in enumerate(items) if isinstance(x, list)]
        if id_at:
            decoded = await asyncio.to_thread(_decode_ids, model, [items[i] for i in id_at])
            for i, text in zip(id_at, decoded, strict=True):
                items[i] = text
        texts = items
    _check_batch(state, len(texts), "inputs")
    if not texts:
        raise InvalidInputError("inputs: give at least one text")
    request.scope["state"]["info"]["items"] = len(texts)
    state.http_metrics.items.labels(route).inc(len(texts))
    prepare = functools.partial(_prepare, model, texts, kind=kind, truncate=truncate, side=side)
    # admission by size before tokenizing, as on every inference route (re-counted once tokenized:
    # ColBERT's query expansion can make a short query longer than its bytes)
    out, headers = await run_inference(request, name, model, prepare, estimate_for_texts(model, texts))
    assert isinstance(out, MultiVectorOutput)
    return name, model, out, headers


@router.post("/embed_all", responses={200: {"model": EmbedAllAnswer}}, summary="Per-token vectors (TEI shape; ColBERT query/document vectors)")
async def tei_embed_all(body: TEIEmbedAllRequest, request: Request) -> Response:
    """TEI's answer: ``[[[float]]]``, per input its tokens' vectors. ColBERT models encode the inputs
    as documents unless ``prompt_name`` is ``query``."""
    _, _, out, headers = await _multivector(
        request, body.model, body.inputs, route="/embed_all", kind=None, truncate=body.truncate is not False,
        side=_side(body.truncation_direction), prompt_name=body.prompt_name,
    )
    return _json(out.vectors, headers)


@router.post("/embed_multivector", responses={200: {"model": MultiVectorResponse}}, summary="Per-token vectors of queries or documents (native shape)")
async def embed_multivector(body: MultiVectorRequest, request: Request) -> Response:
    name, _model, out, headers = await _multivector(
        request, body.model, body.input, route="/embed_multivector", kind=body.kind,
        truncate=body.truncate is not False,
    )
    tokens = _tokens(out)
    data = [{"object": "multi_vector", "index": i, "tokens": int(v.shape[0]), "embedding": v}
            for i, v in enumerate(out.vectors)]
    return _json({"object": "list", "data": data, "model": name, "dimension": int(out.vectors[0].shape[1]) if out.vectors else 0,
                  "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}, headers)

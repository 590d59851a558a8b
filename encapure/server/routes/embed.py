"""Embeddings in the wire shapes clients send: OpenAI's ``/v1/embeddings`` (and ``/embeddings``),
TEI's ``/embed`` and the hub's ``/similarity``, over one prepare-and-run path that also takes token ids."""

from __future__ import annotations

import base64
import functools
from typing import Any, Literal

import numpy as np
from fastapi import Request
from starlette.responses import Response

from encapure.engine.types import EmbedOutput, InferenceModel, Prepared, Side
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
from encapure.server.schemas import (
    EmbedAnswer,
    OpenAIEmbeddingsRequest,
    OpenAIEmbeddingsResponse,
    SimilarityAnswer,
    SimilarityParameters,
    TEIEmbedRequest,
    TEISimilarityRequest,
)

router = family_router()


def _prepare_embed(
    model: InferenceModel,
    texts: list[str],
    *,
    truncate: bool,
    side: Side | None,
    kind: Any,
    dimensions: int | None,
    normalize: bool | None,
) -> Prepared:
    """``model.prepare_texts``, cutting from the requested side first when it is not the model's."""
    if side is not None and side != _model_side(model) and truncate and texts:
        room = model.max_length - _specials(model, pair=False)
        texts = _clip(model, texts, [room] * len(texts), side)
    return model.prepare_texts(texts, truncate=truncate, kind=kind, dimensions=dimensions, normalize=normalize)


def _prepare_embed_items(model: InferenceModel, items: list[str | list[int]], **kw: Any) -> Prepared:
    """``_prepare_embed`` over texts and token-id lists (decoded here, off the event loop)."""
    id_at = [i for i, x in enumerate(items) if isinstance(x, list)]
    texts = [x if isinstance(x, str) else "" for x in items]
    if id_at:
        decoded = _decode_ids(model, [x for x in items if isinstance(x, list)])
        for i, text in zip(id_at, decoded, strict=True):
            texts[i] = text
    return _prepare_embed(model, texts, **kw)


# --- embeddings ---------------------------------------------------------------------------------
def _decode_ids(model: InferenceModel, batches: list[list[int]]) -> list[str]:
    """Token-id input must be in the model's own vocabulary: we decode it and tokenize again. Ids
    the tokenizer produced come back the same (special tokens aside); ids of another tokenizer
    (langchain's OpenAIEmbeddings sends OpenAI's cl100k ids by default) decode to unrelated word
    pieces that re-tokenize differently, and would embed garbage with a 200: they are refused."""
    vocab = model.vocab_size
    for ids in batches:
        if not ids:
            raise InvalidInputError("input: an empty list of token ids")
        if min(ids) < 0 or max(ids) >= vocab:
            raise InvalidInputError(
                f"input: token ids must lie in [0, {vocab}) for model {model.name!r} ({_FOREIGN_IDS})"
            )
    shown = [model.decode(ids, skip_special_tokens=False) for ids in batches]  # "[CLS] ... [UNK] ..."
    again = model.encode_batch(shown, "raw", add_special_tokens=False)
    for i, (ids, enc) in enumerate(zip(batches, again, strict=True)):
        if list(enc.ids) != list(ids):
            raise InvalidInputError(
                f"input[{i}]: these token ids are not what model {model.name!r}'s tokenizer makes of any "
                f"text ({_FOREIGN_IDS})"
            )
    return [model.decode(ids, skip_special_tokens=True) for ids in batches]


_FOREIGN_IDS = (
    "ids from another tokenizer embed unrelated text: send the text instead; langchain's OpenAIEmbeddings "
    "sends OpenAI's token ids unless check_embedding_ctx_length=False"
)


async def _embed(
    request: Request,
    model_name: str | None,
    inputs: Any,
    *,
    route: str,
    dimensions: int | None = None,
    normalize: bool | None = None,
    truncate: bool = True,
    side: Side | None = None,
    kind: Any = None,
    prompt_name: str | None = None,
) -> tuple[str, EmbedOutput, dict[str, str]]:
    state = _state(request)
    name, model = pick_model(state, model_name, ("embed",), route)
    if prompt_name is not None:
        kind = _prompt_kind(name, model, prompt_name)
    items: list[str | list[int]]
    if isinstance(inputs, str):
        items = [inputs]
    elif inputs and isinstance(inputs[0], int):
        items = [list(inputs)]
    else:  # texts and lists of token ids, mixed as TEI allows
        items = list(inputs)
    _check_batch(state, len(items), "inputs")
    request.scope["state"]["info"]["items"] = len(items)
    state.http_metrics.items.labels(route).inc(len(items))
    if not items:
        raise InvalidInputError("input: give at least one text")
    prepare = functools.partial(
        _prepare_embed_items,
        model,
        items,
        truncate=truncate,
        side=side,
        kind=kind,
        dimensions=dimensions,
        normalize=normalize,
    )
    # token ids are decoded (and checked) in the prepare step, after admission; an id list of n
    # tokens is at most n tokens again
    bound = [x if isinstance(x, str) else "x" * len(x) for x in items]
    out, headers = await run_inference(request, name, model, prepare, estimate_for_texts(model, bound))
    assert isinstance(out, EmbedOutput)
    return name, out, headers


_PROMPTS = {"query": "query", "document": "document", "passage": "document"}


def _prompt_kind(name: str, model: InferenceModel, prompt_name: str) -> Literal["query", "document"]:
    """TEI's ``prompt_name``: the model's query or document prefix; any other name is a 400, as in
    TEI (a prompt the model does not have would otherwise be silently skipped)."""
    kind = _PROMPTS.get(prompt_name)
    if kind is None:
        raise InvalidInputError(
            f"prompt_name {prompt_name!r} is not a prompt of model {name!r}; it has: query, document (passage)"
        )
    return "query" if kind == "query" else "document"


@router.post("/v1/embeddings", responses={200: {"model": OpenAIEmbeddingsResponse}}, summary="Embeddings (OpenAI shape; float or base64)")
@router.post("/embeddings", responses={200: {"model": OpenAIEmbeddingsResponse}}, summary="Embeddings (OpenAI shape; the path without /v1)")
async def embeddings(body: OpenAIEmbeddingsRequest, request: Request) -> Response:
    """``user`` is OpenAI's opaque end-user id: written to the request's log line, never interpreted."""
    if body.user is not None:
        request.scope["state"]["info"]["user"] = body.user
    kind = None
    if body.input_type is not None:
        kind = "query" if body.input_type in ("query", "search_query") else "document"
    name, out, headers = await _embed(
        request, body.model, body.input, route=request.scope["path"], dimensions=body.dimensions or None, kind=kind
    )
    emb = np.ascontiguousarray(out.embeddings, dtype=np.float32)
    if body.encoding_format == "base64":
        le = emb.astype("<f4", copy=False)
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": base64.b64encode(le[i].tobytes()).decode("ascii"),
            }
            for i in range(le.shape[0])
        ]
    else:
        data = [{"object": "embedding", "index": i, "embedding": emb[i]} for i in range(emb.shape[0])]
    tokens = _tokens(out)
    return _json(
        {
            "object": "list",
            "data": data,
            "model": name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        },
        headers,
    )


@router.post("/embed", responses={200: {"model": EmbedAnswer}}, summary="Embeddings (TEI shape; texts or token ids)")
async def tei_embed(body: TEIEmbedRequest, request: Request) -> Response:
    _, out, headers = await _embed(
        request,
        body.model,
        body.inputs,
        route="/embed",
        dimensions=body.dimensions,
        normalize=body.normalize,
        truncate=body.truncate is not False,
        side=_side(body.truncation_direction),
        prompt_name=body.prompt_name,
    )
    return _json(np.ascontiguousarray(out.embeddings, dtype=np.float32), headers)


@router.post("/similarity", responses={200: {"model": SimilarityAnswer}}, summary="Cosine similarity of sentences to a source sentence (TEI shape)")
async def tei_similarity(body: TEISimilarityRequest, request: Request) -> Response:
    """The hub's sentence-similarity task: one embedding request for the source and the sentences."""
    params = body.parameters or SimilarityParameters()
    if not body.inputs.sentences:
        return _json([])
    _, out, headers = await _embed(
        request,
        body.model,
        [body.inputs.source_sentence, *body.inputs.sentences],
        route="/similarity",
        normalize=True,
        truncate=params.truncate is not False,
        side=_side(params.truncation_direction),
        prompt_name=params.prompt_name,
    )
    emb = out.embeddings.astype(np.float64)
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    return _json((emb[1:] @ emb[0]).tolist(), headers)

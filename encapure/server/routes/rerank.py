"""Reranking in the wire shapes clients send: the native/Infinity/TEI ``/rerank`` and Cohere's
(also Jina's, vLLM's) ``/v1/rerank`` and ``/v2/rerank``, over one prepare-and-run path."""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from typing import Any

from fastapi import Request
from starlette.responses import Response

from encapure.engine.prompts import check_instruction
from encapure.engine.types import InferenceModel, LongDocuments, Prepared, RerankOutput, RerankResult, Side
from encapure.errors import InvalidInputError
from encapure.server.routes.common import (
    _check_batch,
    _clip,
    _json,
    _model_side,
    _scores,
    _side,
    _specials,
    _state,
    _tokens,
    estimate_for_pairs,
    family_router,
    pick_model,
    run_inference,
)
from encapure.server.schemas import (
    CohereRerankResponse,
    CohereV1RerankRequest,
    CohereV2RerankRequest,
    Document,
    RerankAnswer,
    RerankRequest,
)

router = family_router()


def _doc_texts(documents: Sequence[Document], rank_fields: list[str] | None = None) -> list[str]:
    """What is scored of each document: a string as is; of an object its ``text``, or with Cohere
    v1's ``rank_fields`` those fields as ``name: value`` lines (``["text"]`` alone is ``text``)."""
    fields = rank_fields if rank_fields and rank_fields != ["text"] else None
    out: list[str] = []
    for i, d in enumerate(documents):
        if isinstance(d, str):
            out.append(d)
            continue
        if fields is None:
            if d.text is None:
                raise InvalidInputError(
                    f"documents[{i}]: an object document needs a `text` field (or name the fields "
                    "to score with rank_fields on /v1/rerank)"
                )
            out.append(d.text)
            continue
        values = d.model_dump(exclude_none=True)
        missing = [f for f in fields if f not in values]
        if missing:
            raise InvalidInputError(f"documents[{i}] lacks the rank_fields {missing}")
        out.append("\n".join(f"{f}: {values[f]}" for f in fields))
    return out


def _prepare_rerank(
    model: InferenceModel,
    query: str,
    texts: list[str],
    *,
    truncate: bool,
    raw: bool,
    long_documents: LongDocuments,
    side: Side | None = None,
    max_tokens_per_doc: int | None = None,
    max_chunks: int | None = None,
    instruction: str | None = None,
) -> Prepared:
    """``model.prepare_pairs`` after the per-request cuts the engine has no option for: a
    truncation side other than the model's, Cohere v2's ``max_tokens_per_doc`` and v1's
    ``max_chunks_per_doc`` (the document is cut to what that many overlapping windows cover)."""
    template = getattr(model, "prompt_template", None)
    check_instruction(instruction, template, model.name)
    if template is not None and side == "left" and truncate:
        raise InvalidInputError(
            f"model {model.name!r} cuts the end of a document (its prompt template puts the answer "
            "after it); truncation_direction must be Right"
        )
    if max_tokens_per_doc is not None:
        texts = _clip(model, texts, [max_tokens_per_doc] * len(texts), "right")
    room_of = getattr(model, "text_room", None)
    if room_of is not None:  # ColBERT: documents are encoded alone, cut at the model's document length
        if side is not None and side != _model_side(model) and truncate and texts:
            texts = _clip(model, texts, [room_of("document")] * len(texts), side)
        if (max_chunks or 0) > 1:
            long_documents = "window"  # refused with a 400 by the model: MaxSim has no windows here
        return model.prepare_pairs(query, texts, truncate=truncate, raw_scores=raw, long_documents=long_documents)
    needs_room = (side is not None and side != _model_side(model) and truncate) or (max_chunks or 0) > 1
    if needs_room and texts:
        q_len = len(model.encode_batch([query], "raw", add_special_tokens=False)[0].ids)
        room = model.max_length - _specials(model, pair=True) - q_len
        if room > 0 and max_chunks is not None and max_chunks > 1:
            overlap = min(int(getattr(model, "window_overlap", 0)), room // 2)
            texts = _clip(model, texts, [room + (max_chunks - 1) * (room - overlap)] * len(texts), "right")
            long_documents = "window"
        elif room > 0 and side is not None:
            texts = _clip(model, texts, [room] * len(texts), side)
    extra = {} if instruction is None else {"instruction": instruction}
    return model.prepare_pairs(query, texts, truncate=truncate, raw_scores=raw, long_documents=long_documents,
                               **extra)


# --- rerank ----------------------------------------------------------------------------------------
async def _rerank(
    request: Request,
    model_name: str | None,
    query: str,
    texts: list[str],
    *,
    raw: bool = False,
    truncate: bool = True,
    long_documents: LongDocuments = "truncate",
    side: Side | None = None,
    max_tokens_per_doc: int | None = None,
    max_chunks: int | None = None,
    instruction: str | None = None,
    route: str,
) -> tuple[str, RerankOutput, dict[str, str]]:
    state = _state(request)
    name, model = pick_model(state, model_name, ("rerank",), route)
    _check_batch(state, len(texts), "documents")
    request.scope["state"]["info"]["items"] = len(texts)
    state.http_metrics.items.labels(route).inc(len(texts))
    prepare = functools.partial(
        _prepare_rerank,
        model,
        query,
        texts,
        truncate=truncate,
        raw=raw,
        long_documents=long_documents,
        side=side,
        max_tokens_per_doc=max_tokens_per_doc,
        max_chunks=max_chunks,
        instruction=instruction,
    )
    window = long_documents == "window" or (max_chunks or 0) > 1
    estimate = estimate_for_pairs(model, query, texts, window=window)
    out, headers = await run_inference(request, name, model, prepare, estimate)
    assert isinstance(out, RerankOutput)
    return name, out, headers


def _as_object(d: Document) -> dict[str, Any]:
    return {"text": d} if isinstance(d, str) else d.model_dump(exclude_none=True)


@router.post("/rerank", responses={200: {"model": RerankAnswer}}, summary="Rerank documents for a query (native, Infinity and TEI shapes)")
async def rerank(body: RerankRequest, request: Request) -> Response:
    """``documents``: the native answer (an object; Infinity's clients read it too). ``texts``:
    TEI's answer, a bare list of ``{"index", "score", "text"?}`` sorted by score."""
    tei = body.texts is not None
    docs: list[Document] = list(body.texts) if body.texts is not None else list(body.documents or [])
    name, out, headers = await _rerank(
        request,
        body.model,
        body.query,
        _doc_texts(docs),
        raw=body.raw_scores,
        truncate=body.truncate is not False,
        long_documents=body.long_documents,
        side=_side(body.truncation_direction),
        instruction=body.instruction,
        route="/rerank",
    )
    ranked = out.ranked(body.top_n)
    if tei:
        texts = body.texts or []
        if body.return_documents:
            return _json([{"index": r.index, "score": r.score, "text": texts[r.index]} for r in ranked], headers)
        return _json([{"index": r.index, "score": r.score} for r in ranked], headers)
    results: list[dict[str, Any]] = []
    for r in ranked:
        item: dict[str, Any] = {"index": r.index, "score": r.score, "relevance_score": r.score}
        if body.return_documents:
            d = docs[r.index]
            item["document"] = d if isinstance(d, str) else d.model_dump(exclude_none=True)
        results.append(item)
    tokens = _tokens(out)
    return _json(
        {
            "object": "rerank",
            "id": request.scope["state"]["request_id"],
            "created": int(time.time()),
            "model": name,
            "results": results,
            "scores": _scores(out),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        },
        headers,
    )


def _cohere_results(ranked: list[RerankResult], docs: Sequence[Document], with_docs: bool) -> list[dict]:
    if with_docs:
        return [{"index": r.index, "relevance_score": r.score, "document": _as_object(docs[r.index])} for r in ranked]
    return [{"index": r.index, "relevance_score": r.score} for r in ranked]


async def _cohere_rerank(
    request: Request, body: CohereV1RerankRequest | CohereV2RerankRequest, version: str
) -> Response:
    """Cohere v1 (also Jina, vLLM, Infinity under /v1) and v2 differ on the wire only in the
    reported API version, and in their per-document options."""
    route = f"/v{version}/rerank"
    rank_fields = max_chunks = max_tokens = None
    raw = False
    if isinstance(body, CohereV1RerankRequest):
        rank_fields, max_chunks, raw = body.rank_fields, body.max_chunks_per_doc, body.raw_scores
    else:
        max_tokens = body.max_tokens_per_doc
    name, out, headers = await _rerank(
        request,
        body.model,
        body.query,
        _doc_texts(body.documents, rank_fields),
        raw=raw,
        max_tokens_per_doc=max_tokens,
        max_chunks=max_chunks,
        instruction=body.instruction,
        route=route,
    )
    tokens = _tokens(out)
    return _json(
        {
            "id": request.scope["state"]["request_id"],
            "model": name,
            "results": _cohere_results(out.ranked(body.top_n), body.documents, body.return_documents),
            "meta": {"api_version": {"version": version}, "billed_units": {"search_units": 1}},
            "usage": {"total_tokens": tokens, "prompt_tokens": tokens},
        },
        headers,
    )


@router.post("/v1/rerank", responses={200: {"model": CohereRerankResponse}}, summary="Rerank (Cohere v1 and Jina shapes)")
async def rerank_v1(body: CohereV1RerankRequest, request: Request) -> Response:
    return await _cohere_rerank(request, body, "1")


@router.post("/v2/rerank", responses={200: {"model": CohereRerankResponse}}, summary="Rerank (Cohere v2 shape)")
async def rerank_v2(body: CohereV2RerankRequest, request: Request) -> Response:
    return await _cohere_rerank(request, body, "2")

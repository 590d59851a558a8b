"""The routes. Handlers validate, pick the model, hand tokenization and inference to the
scheduler and shape the answer; they never block the event loop and never map errors themselves
(they raise ``EncapureError`` and ``encapure.server.errors`` renders it)."""

from __future__ import annotations

import asyncio
import base64
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import orjson
from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.responses import Response

from encapure import __version__
from encapure.engine.types import (
    ClassifyOutput,
    EmbedOutput,
    InferenceModel,
    LongDocuments,
    ModelOutput,
    Prepared,
    RerankOutput,
    RerankResult,
    Side,
    Unit,
)
from encapure.errors import (
    InvalidInputError,
    ModelNotFoundError,
    PayloadTooLargeError,
    UnavailableError,
    WrongTaskError,
)
from encapure.scheduler import faults
from encapure.server.errors import error_response
from encapure.server.schemas import (
    CohereV1RerankRequest,
    CohereV2RerankRequest,
    Document,
    OpenAIEmbeddingsRequest,
    RerankRequest,
    SimilarityParameters,
    TEIDecodeRequest,
    TEIEmbedRequest,
    TEIPredictRequest,
    TEISimilarityRequest,
    TEITokenizeRequest,
    TruncationDirection,
    describe_keys,
)
from encapure.server.state import ServerState

router = APIRouter()

_JSON = "application/json"
_NUMPY = orjson.OPT_SERIALIZE_NUMPY


def _state(request: Request) -> ServerState:
    return request.app.state.encapure


def _json(obj: Any, headers: dict[str, str] | None = None, status: int = 200) -> Response:
    return Response(
        orjson.dumps(obj, option=_NUMPY, default=str), status_code=status, media_type=_JSON, headers=headers
    )


# --- model choice -----------------------------------------------------------------------------
_TASK_WORDS = {"rerank": "reranking", "embed": "embedding", "classify": "classification"}


def pick_model(
    state: ServerState, name: str | None, tasks: tuple[str, ...], route: str
) -> tuple[str, InferenceModel]:
    wanted = " or ".join(_TASK_WORDS[t] for t in tasks)
    loaded = ", ".join(f"{n} ({m.task})" for n, m in state.models.items()) or "none yet"
    if name:
        name = state.resolve(name)
        model = state.models.get(name)
        if model is None:
            if state.phase == "starting":
                state.require_scheduler()  # 503 not ready: the model may be on its way
            able = [(n, m) for n, m in state.models.items() if m.task in tasks]
            # Clients send hard-coded names (rerank-english-v3.0, text-embedding-3-small) and TEI
            # ignores the name: with exactly one model that can answer, it answers and says its name.
            if len(able) == 1 and not state.settings.strict_model_names:
                return able[0]
            why = f"{len(able)} loaded models can answer {route}" if able else f"none can answer {route}"
            raise ModelNotFoundError(f"model {name!r} is not served here ({why}); loaded: {loaded}")
        if model.task not in tasks:
            raise WrongTaskError(
                f"model {name!r} does {_TASK_WORDS[model.task]}; {route} needs a {wanted} model "
                f"(loaded: {loaded})"
            )
        return name, model
    for n, m in state.models.items():
        if m.task in tasks:
            return n, m
    if state.phase == "starting":
        state.require_scheduler()
    raise WrongTaskError(f"no {wanted} model is loaded, so {route} cannot answer; loaded: {loaded}")


# --- the inference path --------------------------------------------------------------------------
class DisconnectWatcher:
    """Notices a client that went away, cheaply: one task parked on ``receive()`` (which, once the
    body is read, only ever returns ``http.disconnect``), and a plain flag the scheduler can poll."""

    __slots__ = ("_task", "disconnected")

    def __init__(self, receive: Callable[[], Any]) -> None:
        self.disconnected = False
        self._task = asyncio.get_running_loop().create_task(self._watch(receive))

    async def _watch(self, receive: Callable[[], Any]) -> None:
        try:
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    self.disconnected = True
                    return
        except Exception:  # a broken transport is a disconnect too
            self.disconnected = True

    def is_cancelled(self) -> bool:
        return self.disconnected

    def stop(self) -> None:
        self._task.cancel()


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


async def run_inference(
    request: Request, name: str, model: InferenceModel, prepare: Callable[[], Prepared]
) -> tuple[ModelOutput, dict[str, str]]:
    """The scheduler's one inference flow (tokenize off the loop, queue for a shared batch,
    finish), with this request's deadline and disconnect watch. Returns the output and headers."""
    state = _state(request)
    sched = state.require_scheduler()
    info: dict[str, Any] = request.scope["state"]["info"]
    if state.fault_injection and (fault := request.headers.get("x-encapure-fault")):
        prepare = functools.partial(_with_fault, prepare, fault)
    state.enter()
    watcher = DisconnectWatcher(request.receive)
    timings: dict[str, float] = {}
    try:
        out: ModelOutput = await sched.run(
            name,
            prepare,
            model.finish,
            deadline=request.scope["state"]["deadline"],
            is_cancelled=watcher.is_cancelled,
            timings=timings,
        )
    finally:
        watcher.stop()
        if watcher.disconnected:
            info["disconnected"] = True
        state.leave()
    tokenize_s = timings.get("prepare_s", 0.0)
    queue_s = timings.get("queue_s", 0.0)
    infer_s = timings.get("inference_s", 0.0)
    tokens = _tokens(out)
    n_inputs = len(out.tokens)
    info.update(
        model=name,
        items=n_inputs,
        tokens=tokens,
        tokenize_ms=round(tokenize_s * 1000, 2),
        queue_ms=round(queue_s * 1000, 2),
        inference_ms=round(infer_s * 1000, 2),
    )
    headers = {
        "x-tokenization-time": _ms(tokenize_s),
        "x-queue-time": _ms(queue_s),
        "x-inference-time": _ms(infer_s),
        "x-total-tokens": str(tokens),
        "x-items": str(n_inputs),
    }
    if any(out.truncated):
        headers["x-truncated-inputs"] = str(sum(out.truncated))
    state.http_metrics.tokens.labels(request.scope["path"]).inc(tokens)
    return out, headers


def _with_fault(prepare: Callable[[], Prepared], fault: str) -> Prepared:
    """Tests only (``--fault-injection``): the request's units carry the ``x-encapure-fault``."""
    return faults.mark(prepare(), fault)


def _check_batch(state: ServerState, n: int, what: str) -> None:
    limit = state.settings.max_client_batch_size
    if n > limit:
        raise PayloadTooLargeError(
            f"{n} {what} in one request; this server accepts at most {limit} (--max-client-batch-size)"
        )


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


# --- cutting texts to a token budget (TEI truncation_direction, Cohere's per-document limits) ------
def _side(direction: TruncationDirection | None) -> Side | None:
    return None if direction is None else ("left" if direction.lower() == "left" else "right")


def _clip(model: InferenceModel, texts: list[str], limits: Sequence[int | None], side: Side) -> list[str]:
    """Cut each text to at most ``limits[i]`` tokens of the model's tokenizer (no specials), keeping
    its start (side ``right``) or its end (``left``), at token boundaries of the original text.
    Runs in the request's prepare step, off the event loop."""
    encs = model.encode_batch(texts, "raw", add_special_tokens=False)
    out = []
    for text, enc, limit in zip(texts, encs, limits, strict=True):
        n = len(enc.ids)
        if limit is None or n <= limit or limit <= 0:
            out.append(text)
        elif side == "right":
            out.append(text[: enc.offsets[limit - 1][1]])
        else:
            out.append(text[enc.offsets[n - limit][0] :])
    return out


def _specials(model: InferenceModel, pair: bool) -> int:
    item: Any = ("", "") if pair else ""
    return len(model.encode_batch([item], "raw")[0].ids)


def _model_side(model: InferenceModel) -> Side:
    side: Side = getattr(model, "truncation_side", "right")
    return side


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
) -> Prepared:
    """``model.prepare_pairs`` after the per-request cuts the engine has no option for: a
    truncation side other than the model's, Cohere v2's ``max_tokens_per_doc`` and v1's
    ``max_chunks_per_doc`` (the document is cut to what that many overlapping windows cover)."""
    if max_tokens_per_doc is not None:
        texts = _clip(model, texts, [max_tokens_per_doc] * len(texts), "right")
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
    return model.prepare_pairs(query, texts, truncate=truncate, raw_scores=raw, long_documents=long_documents)


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
    )
    out, headers = await run_inference(request, name, model, prepare)
    assert isinstance(out, RerankOutput)
    return name, out, headers


def _scores(out: RerankOutput) -> list[float]:
    return out.scores.astype(np.float64).tolist()


def _tokens(out: ModelOutput) -> int:
    return int(sum(out.tokens))


def _as_object(d: Document) -> dict[str, Any]:
    return {"text": d} if isinstance(d, str) else d.model_dump(exclude_none=True)


@router.post("/rerank", summary="Rerank documents for a query (native, Infinity and TEI shapes)")
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


def _cohere_results(ranked: list[RerankResult], docs: list[Document], with_docs: bool) -> list[dict]:
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


@router.post("/v1/rerank", summary="Rerank (Cohere v1 and Jina shapes)")
async def rerank_v1(body: CohereV1RerankRequest, request: Request) -> Response:
    return await _cohere_rerank(request, body, "1")


@router.post("/v2/rerank", summary="Rerank (Cohere v2 shape)")
async def rerank_v2(body: CohereV2RerankRequest, request: Request) -> Response:
    return await _cohere_rerank(request, body, "2")


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
    texts: list[str]
    if isinstance(inputs, str):
        texts = [inputs]
    elif inputs and isinstance(inputs[0], int):
        texts = await asyncio.to_thread(_decode_ids, model, [inputs])
    else:  # texts and lists of token ids, mixed as TEI allows
        items = list(inputs)
        _check_batch(state, len(items), "inputs")
        id_at = [i for i, x in enumerate(items) if isinstance(x, list)]
        if id_at:
            decoded = await asyncio.to_thread(_decode_ids, model, [items[i] for i in id_at])
            for i, text in zip(id_at, decoded, strict=True):
                items[i] = text
        texts = items
    _check_batch(state, len(texts), "inputs")
    request.scope["state"]["info"]["items"] = len(texts)
    state.http_metrics.items.labels(route).inc(len(texts))
    if not texts:
        raise InvalidInputError("input: give at least one text")
    prepare = functools.partial(
        _prepare_embed,
        model,
        texts,
        truncate=truncate,
        side=side,
        kind=kind,
        dimensions=dimensions,
        normalize=normalize,
    )
    out, headers = await run_inference(request, name, model, prepare)
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


@router.post("/v1/embeddings", summary="Embeddings (OpenAI shape; float or base64)")
@router.post("/embeddings", summary="Embeddings (OpenAI shape; the path without /v1)")
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


def _model_card(state: ServerState, name: str, model: InferenceModel) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": int(state.started_at), "owned_by": "encapure",
            "task": model.task, "aliases": sorted(a for a, n in state.aliases.items() if n == name)}


@router.get("/v1/models", summary="Served models (OpenAI shape)")
@router.get("/models", summary="Served models (OpenAI shape; the path without /v1)")
async def list_models(request: Request) -> Response:
    state = _state(request)
    return _json({"object": "list", "data": [_model_card(state, n, m) for n, m in state.models.items()]})


@router.get("/v1/models/{model_id:path}", summary="One served model (OpenAI shape)")
async def get_model(model_id: str, request: Request) -> Response:
    """Metadata of a model by its exact name: unlike inference, no other model stands in for it."""
    state = _state(request)
    name = state.resolve(model_id)
    model = state.models.get(name)
    if model is None:
        raise ModelNotFoundError(f"model {model_id!r} is not served here; loaded: {', '.join(state.models)}")
    return _json(_model_card(state, name, model))


@router.post("/embed", summary="Embeddings (TEI shape; texts or token ids)")
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


def _prepare_classify(
    model: InferenceModel, texts: list[str], *, truncate: bool, raw: bool, side: Side | None
) -> Prepared:
    if side is not None and side != _model_side(model) and truncate and texts:
        texts = _clip(model, texts, [model.max_length - _specials(model, pair=False)] * len(texts), side)
    return model.prepare_texts(texts, truncate=truncate, raw_scores=raw)


def _prepare_pair_list(
    model: InferenceModel, pairs: list[tuple[str, str]], *, truncate: bool, raw: bool, side: Side | None
) -> Prepared:
    """Pairs cut on the requested side: the second text gives way, as in the model's own mode."""
    if side is not None and side != _model_side(model) and truncate and pairs:
        firsts = model.encode_batch([a for a, _ in pairs], "raw", add_special_tokens=False)
        room = model.max_length - _specials(model, pair=True)
        seconds = _clip(model, [b for _, b in pairs], [room - len(e.ids) for e in firsts], side)
        pairs = [(a, b) for (a, _), b in zip(pairs, seconds, strict=True)]
    return model.prepare_pair_list(pairs, truncate=truncate, raw_scores=raw)


def _prepare_single_on_reranker(
    model: InferenceModel, texts: list[str], *, truncate: bool, raw: bool, side: Side | None
) -> Prepared:
    """A reranker scoring single texts, as TEI's /predict does (a cross-encoder run on one
    sequence): the model's own tokenizer and truncation, one unit per text."""
    if side is not None and side != _model_side(model) and truncate and texts:
        texts = _clip(model, texts, [model.max_length - _specials(model, pair=False)] * len(texts), side)
    encs = model.encode_batch(texts, "single")
    truncated = [bool(e.overflowing) for e in encs]
    if not truncate and any(truncated):
        raise InvalidInputError(
            f"input {truncated.index(True)} is longer than the model's maximum of {model.max_length} tokens "
            "(allow truncation)"
        )
    # type ids always given (zeros for one sequence): units share batches with other requests' pairs
    units = [Unit(ids=np.asarray(e.ids, dtype=np.int64), type_ids=np.asarray(e.type_ids, dtype=np.int64))
             for e in encs]
    return Prepared(units=units, owners=np.arange(len(units), dtype=np.int64), n_inputs=len(units),
                    tokens=[len(u) for u in units], truncated=truncated, options={"raw_scores": raw})


def _prepare_predict(
    model: InferenceModel, batch: list[list[str]], *, truncate: bool, raw: bool, side: Side | None
) -> Prepared:
    """TEI's /predict batch: single texts and pairs, mixed in any order, as one prepared request."""
    singles = [i for i, item in enumerate(batch) if len(item) == 1]
    pairs = [i for i, item in enumerate(batch) if len(item) == 2]
    parts: list[tuple[list[int], Prepared]] = []
    if singles:
        texts = [batch[i][0] for i in singles]
        single_prepare = _prepare_single_on_reranker if model.task == "rerank" else _prepare_classify
        parts.append((singles, single_prepare(model, texts, truncate=truncate, raw=raw, side=side)))
    if pairs:
        two = [(batch[i][0], batch[i][1]) for i in pairs]
        parts.append((pairs, _prepare_pair_list(model, two, truncate=truncate, raw=raw, side=side)))
    if len(parts) == 1 and len(parts[0][0]) == len(batch):
        return parts[0][1]
    units: list[Unit] = []
    owners: list[npt.NDArray[np.int64]] = []
    tokens = [0] * len(batch)
    truncated = [False] * len(batch)
    for where, prep in parts:
        index = np.asarray(where, dtype=np.int64)
        units += prep.units
        owners.append(index[prep.owners])
        for j, i in enumerate(where):
            tokens[i], truncated[i] = prep.tokens[j], prep.truncated[j]
    return Prepared(units=units, owners=np.concatenate(owners), n_inputs=len(batch), tokens=tokens,
                    truncated=truncated, options=parts[0][1].options)


@router.post("/predict", summary="Classification scores (TEI shape)")
async def tei_predict(body: TEIPredictRequest, request: Request) -> Response:
    preds, single, headers = await _predict(body, request)
    return _json(preds[0] if single else preds, headers)


async def _predict(
    body: TEIPredictRequest, request: Request, raw: bool | None = None
) -> tuple[list[list[dict[str, Any]]], bool, dict[str, str]]:
    """Per input, its labels and scores best first; and whether the request was one input.
    As TEI reads ``inputs``: a text, a ``[text, pair]``, or a batch of either (a list of strings
    other than two is a batch of texts)."""
    state = _state(request)
    name, model = pick_model(state, body.model, ("classify", "rerank"), "/predict")
    inputs = body.inputs
    raw_scores = body.raw_scores if raw is None else raw
    batch: list[list[str]]
    if isinstance(inputs, str):
        single, batch = True, [[inputs]]
    elif inputs and all(isinstance(x, str) for x in inputs):
        single = len(inputs) == 2
        batch = [[str(x) for x in inputs]] if single else [[str(x)] for x in inputs]
    else:
        single, batch = False, [list(x) if isinstance(x, list) else [x] for x in inputs]
    _check_batch(state, len(batch), "inputs")
    request.scope["state"]["info"]["items"] = len(batch)
    if not batch:
        return [], False, {}
    for item in batch:
        if len(item) not in (1, 2):
            raise InvalidInputError("inputs: each item is a text or a [text, text_pair]")
    prepare = functools.partial(
        _prepare_predict,
        model,
        batch,
        truncate=body.truncate is not False,
        raw=raw_scores,
        side=_side(body.truncation_direction),
    )
    out, headers = await run_inference(request, name, model, prepare)
    if isinstance(out, ClassifyOutput):
        preds = [[{"label": lab, "score": s} for lab, s in row] for row in out.top()]
    elif isinstance(out, RerankOutput):
        label = (model.manifest.labels or ["LABEL_0"])[0]
        preds = [[{"label": label, "score": s}] for s in out.scores.astype(np.float64).tolist()]
    else:  # pragma: no cover
        raise InvalidInputError(f"model {name!r} cannot predict")
    return preds, single, headers


async def _hub_classification(data: dict[str, Any], request: Request) -> Response:
    """The hub's text-classification request (``{"inputs", "parameters": {"top_k",
    "function_to_apply"}}``), answered in the hub's shape: one list of labels per input."""
    params = data.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidInputError("parameters must be an object")
    top_k = params.get("top_k")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise InvalidInputError("parameters.top_k must be a positive integer")
    fn = params.get("function_to_apply")
    body = _validate(TEIPredictRequest, {k: v for k, v in data.items() if k != "parameters"})
    raw: bool | None = None
    if fn is not None:
        _, model = pick_model(_state(request), body.model, ("classify", "rerank"), "/predict")
        own = model.manifest.score_activation
        if fn == "none":
            raw = True
        elif fn != own:
            raise InvalidInputError(
                f"parameters.function_to_apply {fn!r}: this model's scores are {own} (or 'none' for raw scores)"
            )
    preds, _, headers = await _predict(body, request, raw=raw)
    if top_k is not None:
        preds = [p[:top_k] for p in preds]
    return _json(preds, headers)


@router.post("/tokenize", summary="Tokenize (TEI shape)")
async def tei_tokenize(body: TEITokenizeRequest, request: Request) -> Response:
    state = _state(request)
    _, model = pick_model(state, body.model, ("rerank", "embed", "classify"), "/tokenize")
    texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
    _check_batch(state, len(texts), "inputs")

    def work() -> list[list[dict[str, Any]]]:
        encs = model.encode_batch(texts, "raw", add_special_tokens=body.add_special_tokens)
        out = []
        for text, enc in zip(texts, encs, strict=True):
            toks = []
            for tid, piece, (start, stop), special in zip(
                enc.ids, enc.tokens, enc.offsets, enc.special_tokens_mask, strict=True
            ):
                toks.append(
                    {
                        "id": tid,
                        "text": piece if special else text[start:stop],
                        "special": bool(special),
                        "start": None if special else start,
                        "stop": None if special else stop,
                    }
                )
            out.append(toks)
        return out

    result = await asyncio.to_thread(work)
    return _json(result)


@router.post("/decode", summary="Token ids to text (TEI shape)")
async def tei_decode(body: TEIDecodeRequest, request: Request) -> Response:
    state = _state(request)
    _, model = pick_model(state, body.model, ("rerank", "embed", "classify"), "/decode")
    raw: list[Any] = list(body.ids)
    batch: list[list[int]] = [raw] if raw and isinstance(raw[0], int) else raw
    _check_batch(state, len(batch), "inputs")
    if any(not ids for ids in batch):
        raise InvalidInputError("ids: an empty list of token ids")
    vocab = model.vocab_size
    if any(min(ids) < 0 or max(ids) >= vocab for ids in batch):
        raise InvalidInputError(f"ids: token ids must lie in [0, {vocab})")

    def work() -> list[str]:
        return [model.decode(ids, skip_special_tokens=body.skip_special_tokens) for ids in batch]

    return _json(await asyncio.to_thread(work))


@router.post("/similarity", summary="Cosine similarity of sentences to a source sentence (TEI shape)")
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


# --- the root: TEI's and SageMaker's one inference route ------------------------------------------
def _root_route(state: ServerState, data: dict[str, Any]) -> str:
    """Which route a request to ``POST /`` means, from its shape and the models' tasks: TEI serves
    one model and answers by its task; with several, the request's shape (and ``model``) decides."""
    if "query" in data and ("texts" in data or "documents" in data):
        return "/rerank"
    if "input" in data:
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


_ROOT_HANDLERS: dict[str, tuple[type[BaseModel], Callable[[Any, Request], Any]]] = {}


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


@router.post("/", summary="Inference by the model's task and the request's shape (TEI)", openapi_extra=_ROOT_BODY)
@router.post(
    "/invocations", summary="Inference by the model's task and the request's shape (SageMaker)",
    openapi_extra=_ROOT_BODY,
)
async def root_inference(request: Request) -> Response:
    """``huggingface_hub.InferenceClient(base_url=...)`` and SageMaker post here. The body is
    validated by the schema of the route it is dispatched to, and answered as that route answers."""
    try:
        data = orjson.loads(await request.body())
    except orjson.JSONDecodeError as e:
        raise InvalidInputError(f"invalid request: malformed JSON body: {e}") from None
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


def _validate(schema: type[BaseModel], data: Any) -> Any:
    """A schema's validation outside FastAPI's, with the same 400 message."""
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from None


@router.get("/", summary="Service name, version, models and where the docs are")
async def root_info(request: Request) -> Response:
    state = _state(request)
    return _json({"name": "encapure", "version": __version__, "phase": state.phase, "docs": "/docs",
                  "models": {n: m.task for n, m in state.models.items()}})


@router.get("/ping", summary="Readiness (SageMaker's and TEI's ping)")
async def ping(request: Request) -> Response:
    return await ready(request)


# --- operations -----------------------------------------------------------------------------------
@router.get("/health", summary="Liveness: the inference workers are alive")
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


@router.get("/ready", summary="Readiness: models loaded and warmed, not draining")
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


@router.get("/info", summary="Models, limits and version (TEI's Info fields first)")
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
                "admission_timeout_s": s.admission_timeout_s,
                "request_timeout_s": s.request_timeout_s,
                "max_request_bytes": s.max_request_bytes,
                "max_client_batch_size": s.max_client_batch_size,
                "shutdown_timeout_s": s.shutdown_timeout_s,
            },
            "scheduler": state.scheduler.stats() if state.scheduler is not None else None,
        }
    )


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(request: Request) -> Response:
    return Response(generate_latest(_state(request).registry), media_type=CONTENT_TYPE_LATEST)


_ROOT_HANDLERS.update(
    {
        "/rerank": (RerankRequest, rerank),
        "/v1/embeddings": (OpenAIEmbeddingsRequest, embeddings),
        "/embed": (TEIEmbedRequest, tei_embed),
        "/predict": (TEIPredictRequest, tei_predict),
        "/similarity": (TEISimilarityRequest, tei_similarity),
    }
)

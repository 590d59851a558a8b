"""TEI's model-level routes: ``/predict`` (classification scores, also a reranker's on single texts
and pairs, and the hub's text-classification request) and ``/tokenize``, ``/decode``."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import numpy.typing as npt
from fastapi import Request
from starlette.responses import Response

from encapure.engine.estimate import token_bound
from encapure.engine.types import ClassifyOutput, InferenceModel, Prepared, RerankOutput, Side, Unit
from encapure.errors import InvalidInputError, PayloadTooLargeError
from encapure.server.routes.common import (
    _check_batch,
    _clip,
    _json,
    _model_side,
    _side,
    _specials,
    _state,
    _validate,
    estimate_for_texts,
    family_router,
    pick_model,
    run_inference,
    run_tokenizer,
)
from encapure.server.schemas import (
    DecodeAnswer,
    PredictAnswer,
    TEIDecodeRequest,
    TEIPredictRequest,
    TEITokenizeRequest,
    TokenizeAnswer,
)

router = family_router()


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


@router.post("/predict", responses={200: {"model": PredictAnswer}}, summary="Classification scores (TEI shape)")
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
    if model.manifest.output_kind == "multi_vector":
        raise InvalidInputError(
            f"model {name!r} is a ColBERT (late-interaction) model: it scores a query against documents "
            "with /rerank, not texts or pairs with /predict"
        )
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
    estimate = estimate_for_texts(model, [" ".join(item) for item in batch])
    out, headers = await run_inference(request, name, model, prepare, estimate)
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


@router.post("/tokenize", responses={200: {"model": TokenizeAnswer}}, summary="Tokenize (TEI shape)")
async def tei_tokenize(body: TEITokenizeRequest, request: Request) -> Response:
    state = _state(request)
    _, model = pick_model(state, body.model, ("rerank", "embed", "classify"), "/tokenize")
    texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
    _check_batch(state, len(texts), "inputs")

    cap = state.settings.max_tokenize_tokens

    def too_big(n: str) -> PayloadTooLargeError:
        return PayloadTooLargeError(
            f"/tokenize of this request would answer {n} tokens; this server answers at most {cap} "
            "(--max-tokenize-tokens): send fewer or shorter texts"
        )

    chars = sum(len(t) for t in texts)
    if chars > cap * _CHARS_PER_TOKEN_REFUSE:
        # refused before tokenizing: text runs ~4-5 characters a token, so this is far over the cap
        raise too_big(f"about {chars // 5}")

    def work() -> list[list[dict[str, Any]]]:
        # chunk by chunk: the shared tokenizer's lock is held for one chunk at a time, and the
        # answer's size is known (and refused) before it is built
        encs: list[Any] = []
        total = 0
        for chunk in _chunks(texts):
            part = model.encode_batch(chunk, "raw", add_special_tokens=body.add_special_tokens)
            total += sum(len(e.ids) for e in part)
            if total > cap:
                raise too_big(f"more than {cap}")
            encs.extend(part)
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

    bound = sum(token_bound(t) for t in texts) + 4 * len(texts)
    result = await run_tokenizer(request, work, bound)
    return _json(result)


# Characters per token above which a /tokenize request is refused untokenized (real text has 4-5).
_CHARS_PER_TOKEN_REFUSE = 10
# Texts per tokenizer call of /tokenize, and the characters per call (whichever comes first).
_CHUNK_TEXTS = 64
_CHUNK_CHARS = 64 * 1024


def _chunks(texts: list[str]) -> list[list[str]]:
    out: list[list[str]] = []
    cur: list[str] = []
    size = 0
    for t in texts:
        if cur and (len(cur) >= _CHUNK_TEXTS or size + len(t) > _CHUNK_CHARS):
            out.append(cur)
            cur, size = [], 0
        cur.append(t)
        size += len(t)
    if cur:
        out.append(cur)
    return out


@router.post("/decode", responses={200: {"model": DecodeAnswer}}, summary="Token ids to text (TEI shape)")
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

    return _json(await run_tokenizer(request, work, sum(len(ids) for ids in batch)))

"""What every route family shares: the app's state, the JSON answer, the choice of model, the one
inference flow through the scheduler (deadline, disconnect watch, timing headers), the batch limit,
the truncation helpers. Kept apart so a family's module holds only its wire shapes and handlers."""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.responses import Response

from encapure.engine.estimate import WorkEstimate, estimate_pairs, estimate_texts
from encapure.engine.types import InferenceModel, ModelOutput, Prepared, RerankOutput, Side
from encapure.errors import ModelNotFoundError, PayloadTooLargeError, WrongTaskError
from encapure.scheduler import faults
from encapure.server.schemas import TruncationDirection
from encapure.server.state import ServerState

_JSON = "application/json"
_NUMPY = orjson.OPT_SERIALIZE_NUMPY


# --- request bodies: one strict JSON parser for every route -----------------------------------------
_SURROGATE_MESSAGE = (
    "a string holds a lone UTF-16 surrogate (such as \\ud800): JSON strings must be valid Unicode "
    "text (a surrogate only counts as half of a pair, e.g. \\ud83d\\ude00)"
)


class StrictJSONRequest(Request):
    """Bodies parsed by orjson instead of the standard library.

    ``json.loads`` accepts ``"\\ud800"`` (and raw surrogate bytes) and hands the handler a
    ``str`` that no tokenizer and no JSON encoder accepts: the failure surfaced as a 500 after the
    work was queued, or after inference when a document was echoed back. orjson refuses anything
    that is not Unicode scalar values, so every string of every field of every route, document
    metadata included, is valid text before the handler runs; FastAPI turns the decode error into
    a validation error (our 400). It is also faster on the large bodies this service receives."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = orjson.loads(body)
            except orjson.JSONDecodeError as e:
                msg = _SURROGATE_MESSAGE if "surrogate" in e.msg else e.msg
                raise json.JSONDecodeError(msg, e.doc, e.pos) from None
        return self._json


class StrictJSONRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict


def family_router() -> APIRouter:
    """The router of one route family: every route parses its body with ``StrictJSONRequest``."""
    return APIRouter(route_class=StrictJSONRoute)


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
    request: Request,
    name: str,
    model: InferenceModel,
    prepare: Callable[[], Prepared],
    estimate: WorkEstimate | None = None,
) -> tuple[ModelOutput, dict[str, str]]:
    """The scheduler's one inference flow (admission by ``estimate``, tokenize on the bounded pool,
    queue for a shared batch, finish), with this request's deadline and disconnect watch. Returns
    the output and headers."""
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
            estimate=estimate,
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


async def run_tokenizer(request: Request, fn: Callable[[], Any], tokens: int) -> Any:
    """Tokenizer-only work (``/tokenize``, ``/decode``) through the scheduler's admission, with the
    request's deadline and disconnect watch."""
    state = _state(request)
    sched = state.require_scheduler()
    state.enter()
    watcher = DisconnectWatcher(request.receive)
    try:
        return await sched.run_tokenizer(
            fn, tokens=tokens, deadline=request.scope["state"]["deadline"], is_cancelled=watcher.is_cancelled
        )
    finally:
        watcher.stop()
        if watcher.disconnected:
            request.scope["state"]["info"]["disconnected"] = True
        state.leave()


# --- a request's size before it is tokenized (admission decides on it) ----------------------------
# Special tokens a sequence may get ([CLS] a [SEP] b [SEP]; XLM-R's <s> a </s></s> b </s>).
_SPECIALS = 4


def _prefix_bound(model: InferenceModel) -> int:
    man = getattr(model, "manifest", None)
    return max((len(p or "") for p in (getattr(man, "query_prefix", None), getattr(man, "document_prefix", None))),
               default=0)


def estimate_for_texts(model: InferenceModel, texts: Sequence[str]) -> WorkEstimate:
    return estimate_texts(texts, max_length=model.max_length, specials=_SPECIALS + _prefix_bound(model))


def estimate_for_pairs(model: InferenceModel, query: str, docs: Sequence[str], *, window: bool) -> WorkEstimate:
    return estimate_pairs(
        [query] * len(docs), docs, max_length=model.max_length, specials=_SPECIALS, window=window,
        overlap=int(getattr(model, "window_overlap", 0)),
    )


def _with_fault(prepare: Callable[[], Prepared], fault: str) -> Prepared:
    """Tests only (``--fault-injection``): the request's units carry the ``x-encapure-fault``."""
    return faults.mark(prepare(), fault)


def _check_batch(state: ServerState, n: int, what: str) -> None:
    limit = state.settings.max_client_batch_size
    if n > limit:
        raise PayloadTooLargeError(
            f"{n} {what} in one request; this server accepts at most {limit} (--max-client-batch-size)"
        )


# No token of our tokenizers covers more characters (see encapure.engine.model).
_CHARS_PER_TOKEN_MAX = 100


# --- cutting texts to a token budget (TEI truncation_direction, Cohere's per-document limits) ------
def _side(direction: TruncationDirection | None) -> Side | None:
    return None if direction is None else ("left" if direction.lower() == "left" else "right")


def _clip(model: InferenceModel, texts: list[str], limits: Sequence[int | None], side: Side) -> list[str]:
    """Cut each text to at most ``limits[i]`` tokens of the model's tokenizer (no specials), keeping
    its start (side ``right``) or its end (``left``), at token boundaries of the original text.
    Runs in the request's prepare step, off the event loop."""
    # only what the cut can keep is tokenized (no token covers more than _CHARS_PER_TOKEN_MAX
    # characters): a megabyte document costs what its first kilobytes do
    texts = [
        t if limit is None or limit <= 0 or len(t) <= limit * _CHARS_PER_TOKEN_MAX
        else (t[: limit * _CHARS_PER_TOKEN_MAX] if side == "right" else t[-limit * _CHARS_PER_TOKEN_MAX :])
        for t, limit in zip(texts, limits, strict=True)
    ]
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


def _scores(out: RerankOutput) -> list[float]:
    return out.scores.astype(np.float64).tolist()


def _tokens(out: ModelOutput) -> int:
    return int(sum(out.tokens))


def _validate(schema: type[BaseModel], data: Any) -> Any:
    """A schema's validation outside FastAPI's, with the same 400 message."""
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from None

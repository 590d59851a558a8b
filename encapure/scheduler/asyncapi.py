"""asyncio API: ``AsyncReranker``, ``AsyncEmbedder``, ``AsyncClassifier``.

The same calls as the synchronous engine classes, but every call goes through a ``Scheduler``:
concurrent calls from many coroutines are pooled into shared, length-sorted batches exactly as
the HTTP server does, without HTTP. Tokenization runs off the event loop; inference runs on the
scheduler's worker threads, so the loop never blocks on the model.

Usage::

    async with AsyncReranker.from_pretrained("path/or/hub-id") as rr:
        results = await rr.rerank("query", ["doc a", "doc b"], top_n=1)

Several async models can share one scheduler (one set of workers, one queue) with
``AsyncReranker(model, scheduler=sched)``; the scheduler's owner then starts and stops it.
Without ``async with``, the first call starts the scheduler in the running loop and
``await aclose()`` stops it.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Literal

import numpy as np
import numpy.typing as npt

from encapure.engine.api import (
    Classifier,
    Embedder,
    PrepareFn,
    Reranker,
    _Base,
    as_batch,
    check_top_n,
    one_or_all,
)
from encapure.engine.types import (
    ClassifyOutput,
    EmbedOutput,
    InferenceModel,
    LongDocuments,
    ModelOutput,
    MultiVectorOutput,
    RerankOutput,
    RerankResult,
)
from encapure.errors import InvalidInputError, ShuttingDownError
from encapure.manifest import Task
from encapure.scheduler.core import Scheduler
from encapure.scheduler.metrics import SchedulerMetrics
from encapure.settings import Precision, Settings


class _AsyncBase:
    task: ClassVar[Task]
    _sync_cls: ClassVar[type[_Base]]

    def __init__(
        self,
        model: InferenceModel | _Base,
        *,
        settings: Settings | None = None,
        scheduler: Scheduler | None = None,
        metrics: SchedulerMetrics | None = None,
    ) -> None:
        """Wrap a loaded model (or a sync ``Reranker``/``Embedder``/``Classifier``).

        With ``scheduler`` the model must be registered in it under ``model.name`` and the caller
        owns its lifecycle; otherwise a private scheduler is built from ``settings``.
        """
        inner = model.model if isinstance(model, _Base) else model
        self.sync: Any = self._sync_cls(inner)  # type: ignore[arg-type]  # checks the task
        self.model: Any = inner
        self.name: str = inner.name
        if scheduler is not None:
            if self.name not in scheduler.models:
                raise InvalidInputError(f"model {self.name!r} is not registered in the given scheduler")
            self.scheduler = scheduler
            self._owns = False
        else:
            self.scheduler = Scheduler({self.name: inner}, settings or Settings(), metrics, request_caps=False)
            self._owns = True
        self._closed = False

    @classmethod
    def from_pretrained(
        cls,
        id_or_folder: str | Path,
        *,
        precision: Precision | None = None,
        settings: Settings | None = None,
        name: str | None = None,
        **overrides: Any,
    ) -> Any:
        """Load like the sync class's ``from_pretrained`` (blocking: it may export on first use)."""
        sync = cls._sync_cls.from_pretrained(
            id_or_folder, precision=precision, settings=settings, name=name, **overrides
        )
        return cls(sync, settings=settings)

    # --- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._closed:
            raise ShuttingDownError(f"{type(self).__name__} is closed", retry_after=None)
        if self._owns:
            await self._ensure_started()

    async def _ensure_started(self) -> None:
        sched = self.scheduler
        if sched.stats()["started"] and not sched.bound_to_running_loop():
            # started lazily in an earlier event loop (asyncio.run called again): start afresh here
            sched.abandon()
            self.scheduler = Scheduler(sched.models, sched.settings, sched.metrics)
        await self.scheduler.start()

    async def aclose(self, timeout: float = 30.0) -> None:
        """Let calls in progress finish (up to ``timeout`` s) and stop the private scheduler."""
        self._closed = True
        if self._owns:
            if self.scheduler.stats()["started"] and not self.scheduler.bound_to_running_loop():
                self.scheduler.abandon()  # its loop is gone, and with it anything in progress
            else:
                await self.scheduler.shutdown(timeout)

    async def __aenter__(self) -> Any:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @property
    def max_length(self) -> int:
        return int(self.model.max_length)

    # --- the one path every call takes --------------------------------------------------------
    async def _run(self, request: PrepareFn, timeout: float | None) -> ModelOutput:
        if self._closed:
            raise ShuttingDownError(f"{type(self).__name__} is closed", retry_after=None)
        if self._owns:
            await self._ensure_started()
        deadline = None if timeout is None else time.monotonic() + timeout
        return await self.scheduler.run(self.name, request, self.model.finish, deadline=deadline)

    async def embed_multivector(
        self,
        texts: list[str] | str,
        kind: Literal["query", "document"] | None = None,
        *,
        truncate: bool = True,
        timeout: float | None = None,
    ) -> list[npt.NDArray[np.float32]]:
        """Per text its ``[n_tokens, D]`` vectors, as ``Reranker.embed_multivector`` /
        ``Embedder.embed_multivector`` (ColBERT query/document vectors, or an embedder's token rows)."""
        batch, _ = as_batch(texts)
        out = await self._run(self.sync.multivector_request(batch, kind=kind, truncate=truncate), timeout)
        assert isinstance(out, MultiVectorOutput)
        return list(out.vectors)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.model!r})"


class AsyncReranker(_AsyncBase):
    task: ClassVar[Task] = "rerank"
    _sync_cls: ClassVar[type[_Base]] = Reranker

    async def rerank(
        self,
        query: str,
        documents: list[str],
        top_n: int | None = None,
        return_documents: bool = False,
        raw_scores: bool = False,
        *,
        truncate: bool = True,
        long_documents: LongDocuments = "truncate",
        timeout: float | None = None,
        instruction: str | None = None,
    ) -> list[RerankResult]:
        """Documents sorted by relevance to ``query`` (ties keep input order), cut to ``top_n``;
        ``instruction`` as in ``Reranker.rerank``."""
        check_top_n(top_n)
        out = await self.compute(
            query,
            documents,
            raw_scores=raw_scores,
            truncate=truncate,
            long_documents=long_documents,
            timeout=timeout,
            instruction=instruction,
        )
        return out.ranked(top_n, list(documents) if return_documents else None)

    async def compute(
        self,
        query: str,
        documents: list[str],
        *,
        raw_scores: bool = False,
        truncate: bool = True,
        long_documents: LongDocuments = "truncate",
        timeout: float | None = None,
        instruction: str | None = None,
    ) -> RerankOutput:
        """Scores in input order, with token counts and truncation flags."""
        request = self.sync.pairs_request(
            query, documents, raw_scores=raw_scores, truncate=truncate, long_documents=long_documents,
            instruction=instruction,
        )
        out = await self._run(request, timeout)
        assert isinstance(out, RerankOutput)
        return out

    async def score(
        self,
        pairs: list[tuple[str, str]],
        *,
        raw_scores: bool = False,
        truncate: bool = True,
        long_documents: LongDocuments = "truncate",
        timeout: float | None = None,
        instruction: str | None = None,
    ) -> npt.NDArray[np.float32]:
        """One score per (query, document) pair, in input order."""
        request = self.sync.pair_list_request(
            pairs, raw_scores=raw_scores, truncate=truncate, long_documents=long_documents,
            instruction=instruction,
        )
        out = await self._run(request, timeout)
        assert isinstance(out, RerankOutput)
        return out.scores


class AsyncEmbedder(_AsyncBase):
    task: ClassVar[Task] = "embed"
    _sync_cls: ClassVar[type[_Base]] = Embedder

    async def compute(
        self,
        texts: list[str],
        *,
        kind: Literal["query", "document"] | None = None,
        dimensions: int | None = None,
        normalize: bool | None = None,
        truncate: bool = True,
        timeout: float | None = None,
    ) -> EmbedOutput:
        request = self.sync.texts_request(
            texts, kind=kind, dimensions=dimensions, normalize=normalize, truncate=truncate
        )
        out = await self._run(request, timeout)
        assert isinstance(out, EmbedOutput)
        return out

    async def embed(
        self,
        texts: list[str] | str,
        *,
        dimensions: int | None = None,
        normalize: bool | None = None,
        truncate: bool = True,
        timeout: float | None = None,
    ) -> npt.NDArray[np.float32]:
        """``[n, D]`` float32 vectors (one text gives ``[D]``); no query/document prefix."""
        batch, single = as_batch(texts)
        out = await self.compute(
            batch, dimensions=dimensions, normalize=normalize, truncate=truncate, timeout=timeout
        )
        return one_or_all(out.embeddings, single)

    async def embed_query(
        self, texts: list[str] | str, *, dimensions: int | None = None, timeout: float | None = None
    ) -> npt.NDArray[np.float32]:
        """With the model's query prefix (e5 ``query: ``, bge's retrieval instruction)."""
        batch, single = as_batch(texts)
        out = await self.compute(batch, kind="query", dimensions=dimensions, timeout=timeout)
        return one_or_all(out.embeddings, single)

    async def embed_documents(
        self, texts: list[str], *, dimensions: int | None = None, timeout: float | None = None
    ) -> npt.NDArray[np.float32]:
        """With the model's document prefix (e5 ``passage: ``)."""
        out = await self.compute(texts, kind="document", dimensions=dimensions, timeout=timeout)
        return out.embeddings

    @property
    def dimension(self) -> int:
        return int(self.model.output_dim)


class AsyncClassifier(_AsyncBase):
    task: ClassVar[Task] = "classify"
    _sync_cls: ClassVar[type[_Base]] = Classifier

    async def compute(
        self,
        inputs: list[str] | list[tuple[str, str]],
        *,
        raw_scores: bool = False,
        truncate: bool = True,
        timeout: float | None = None,
    ) -> ClassifyOutput:
        out = await self._run(self.sync.inputs_request(inputs, raw_scores=raw_scores, truncate=truncate), timeout)
        assert isinstance(out, ClassifyOutput)
        return out

    async def predict(
        self,
        inputs: list[str] | list[tuple[str, str]],
        *,
        raw_scores: bool = False,
        timeout: float | None = None,
    ) -> list[dict[str, float]]:
        """Per input, ``{label: score}`` (softmax probabilities unless ``raw_scores``), best first."""
        out = await self.compute(inputs, raw_scores=raw_scores, timeout=timeout)
        return [dict(row) for row in out.top()]

    @property
    def labels(self) -> list[str]:
        return list(self.model.labels)

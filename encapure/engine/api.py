"""The synchronous user API: ``Reranker``, ``Embedder``, ``Classifier``.

Thin wrappers over ``OnnxModel``: prepare -> batched run -> finish, in the caller's thread (or on
the model's small worker pool when ``Settings.workers > 1``). The async API and the server use the
scheduler instead, with the same model object underneath.

The argument handling both APIs share (``top_n``, one text vs a list, texts vs pairs, which
``prepare_*`` a call needs) lives here once: each class builds a *request*, a zero-argument
callable that tokenizes, and the sync class runs it in place while the async one hands it to the
scheduler.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import numpy.typing as npt

from encapure.engine.loading import load_model
from encapure.engine.model import OnnxModel
from encapure.engine.types import (
    ClassifyOutput,
    EmbedOutput,
    LongDocuments,
    ModelOutput,
    MultiVectorOutput,
    Prepared,
    RerankOutput,
    RerankResult,
)
from encapure.errors import InvalidInputError, WrongTaskError
from encapure.manifest import Task
from encapure.settings import Precision, Settings

PrepareFn = Callable[[], Prepared]


def check_top_n(top_n: int | None) -> None:
    """Refuse a bad ``top_n`` before any work is done."""
    if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 0):
        raise InvalidInputError(f"top_n must be a non-negative integer, got {top_n!r}")


def as_batch(texts: list[str] | str) -> tuple[list[str], bool]:
    """``(list of texts, whether the caller gave one text)``: one text is a batch of one."""
    if isinstance(texts, str):
        return [texts], True
    return texts, False


def one_or_all(rows: npt.NDArray[np.float32], single: bool) -> npt.NDArray[np.float32]:
    """Undo ``as_batch``: one text gives ``[D]``, a list ``[n, D]``."""
    return rows[0] if single else rows


class _Base:
    task: ClassVar[Task]

    def __init__(self, model: OnnxModel) -> None:
        if model.task != self.task:
            raise WrongTaskError(
                f"{model.name!r} is a {model.task} model; use the {_CLASS_FOR[model.task]} class for it"
            )
        self.model = model

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
        """Load an exported folder, a plain ONNX folder, or a Hugging Face folder / hub id.

        Hugging Face models are exported at ``precision`` (default ``Settings.precision``, int8)
        into ``ENCAPURE_CACHE`` on first use and loaded from there afterwards.
        """
        if precision is not None:
            overrides["precision"] = precision
        path = Path(str(id_or_folder)).expanduser()
        is_plain = path.is_dir() and not (path / "encapure.json").is_file() and any(path.glob("*.onnx"))
        if (is_plain or (path.is_file() and path.suffix == ".onnx")) and "task" not in overrides:
            overrides["task"] = cls.task
        if "task" not in overrides and not path.exists():
            overrides["task"] = cls.task  # export a hub model as what the caller asked for
        return cls(load_model(id_or_folder, settings=settings, name=name, **overrides))

    def _call(self, request: PrepareFn) -> ModelOutput:
        """Run a request in the caller's thread: tokenize, batched forward, finish."""
        return self.model(request())

    def embed_multivector(
        self,
        texts: list[str] | str,
        kind: Literal["query", "document"] | None = None,
        *,
        truncate: bool = True,
    ) -> list[npt.NDArray[np.float32]]:
        """One ``[n_tokens, D]`` float32 matrix per text (a list even for one text).

        ColBERT models (a ``Reranker``): ``kind`` is required, "query" (marker, [MASK] expansion to the
        query length) or "document" (marker, punctuation skip-list and padding removed): store the
        documents' matrices and score later with ``encapure.maxsim``. Embedding models (an
        ``Embedder``): the last hidden state's rows, special tokens included; ``kind`` adds the
        model's query/document prefix. Cross-encoders and classifiers have no token output: 400-style
        ``InvalidInputError``.
        """
        batch, _ = as_batch(texts)
        out = self._call(self.multivector_request(batch, kind=kind, truncate=truncate))
        assert isinstance(out, MultiVectorOutput)
        return out.vectors

    def multivector_request(self, texts: list[str], *, kind: Literal["query", "document"] | None,
                            truncate: bool) -> PrepareFn:
        return functools.partial(self.model.prepare_multivector, texts, kind=kind, truncate=truncate)

    @property
    def max_length(self) -> int:
        return self.model.max_length

    def close(self) -> None:
        self.model.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.model!r})"


class Reranker(_Base):
    task: ClassVar[Task] = "rerank"

    def rerank(
        self,
        query: str,
        documents: list[str],
        top_n: int | None = None,
        return_documents: bool = False,
        raw_scores: bool = False,
        *,
        truncate: bool = True,
        long_documents: LongDocuments = "truncate",
        instruction: str | None = None,
    ) -> list[RerankResult]:
        """Documents sorted by relevance to ``query`` (ties keep input order), cut to ``top_n``.

        ``instruction``: for instruction-following rerankers (Qwen3-Reranker) the task statement put
        in their prompt (default: the model card's); refused (InvalidInputError) by other models.
        """
        check_top_n(top_n)
        out = self.compute(query, documents, raw_scores=raw_scores, truncate=truncate,
                           long_documents=long_documents, instruction=instruction)
        return out.ranked(top_n, list(documents) if return_documents else None)

    def compute(
        self,
        query: str,
        documents: list[str],
        *,
        raw_scores: bool = False,
        truncate: bool = True,
        long_documents: LongDocuments = "truncate",
        instruction: str | None = None,
    ) -> RerankOutput:
        """Scores in input order, with token counts and truncation flags."""
        out = self._call(self.pairs_request(query, documents, raw_scores=raw_scores, truncate=truncate,
                                            long_documents=long_documents, instruction=instruction))
        assert isinstance(out, RerankOutput)
        return out

    def score(
        self,
        pairs: list[tuple[str, str]],
        *,
        raw_scores: bool = False,
        truncate: bool = True,
        long_documents: LongDocuments = "truncate",
        instruction: str | None = None,
    ) -> npt.NDArray[np.float32]:
        """One score per (query, document) pair, in input order."""
        out = self._call(self.pair_list_request(pairs, raw_scores=raw_scores, truncate=truncate,
                                                long_documents=long_documents, instruction=instruction))
        assert isinstance(out, RerankOutput)
        return out.scores

    def pairs_request(self, query: str, documents: list[str], *, raw_scores: bool, truncate: bool,
                      long_documents: LongDocuments, instruction: str | None = None) -> PrepareFn:
        return functools.partial(self.model.prepare_pairs, query, documents, truncate=truncate,
                                 long_documents=long_documents, raw_scores=raw_scores, instruction=instruction)

    def pair_list_request(self, pairs: list[tuple[str, str]], *, raw_scores: bool, truncate: bool,
                          long_documents: LongDocuments, instruction: str | None = None) -> PrepareFn:
        return functools.partial(self.model.prepare_pair_list, pairs, truncate=truncate,
                                 long_documents=long_documents, raw_scores=raw_scores, instruction=instruction)


class Embedder(_Base):
    task: ClassVar[Task] = "embed"

    def compute(
        self,
        texts: list[str],
        *,
        kind: Literal["query", "document"] | None = None,
        dimensions: int | None = None,
        normalize: bool | None = None,
        truncate: bool = True,
    ) -> EmbedOutput:
        out = self._call(self.texts_request(texts, kind=kind, dimensions=dimensions, normalize=normalize,
                                            truncate=truncate))
        assert isinstance(out, EmbedOutput)
        return out

    def embed(
        self,
        texts: list[str] | str,
        *,
        dimensions: int | None = None,
        normalize: bool | None = None,
        truncate: bool = True,
    ) -> npt.NDArray[np.float32]:
        """``[n, D]`` float32 vectors (one text gives ``[D]``); no query/document prefix."""
        batch, single = as_batch(texts)
        out = self.compute(batch, dimensions=dimensions, normalize=normalize, truncate=truncate)
        return one_or_all(out.embeddings, single)

    def embed_query(self, texts: list[str] | str, *, dimensions: int | None = None) -> npt.NDArray[np.float32]:
        """With the model's query prefix (e5 ``query: ``, bge's retrieval instruction)."""
        batch, single = as_batch(texts)
        return one_or_all(self.compute(batch, kind="query", dimensions=dimensions).embeddings, single)

    def embed_documents(self, texts: list[str], *, dimensions: int | None = None) -> npt.NDArray[np.float32]:
        """With the model's document prefix (e5 ``passage: ``)."""
        return self.compute(texts, kind="document", dimensions=dimensions).embeddings

    def texts_request(self, texts: list[str], *, kind: Literal["query", "document"] | None,
                      dimensions: int | None, normalize: bool | None, truncate: bool) -> PrepareFn:
        return functools.partial(self.model.prepare_texts, texts, truncate=truncate, kind=kind,
                                 dimensions=dimensions, normalize=normalize)

    @property
    def dimension(self) -> int:
        return self.model.output_dim


class Classifier(_Base):
    task: ClassVar[Task] = "classify"

    def compute(self, inputs: list[str] | list[tuple[str, str]], *, raw_scores: bool = False,
                truncate: bool = True) -> ClassifyOutput:
        out = self._call(self.inputs_request(inputs, raw_scores=raw_scores, truncate=truncate))
        assert isinstance(out, ClassifyOutput)
        return out

    def predict(self, inputs: list[str] | list[tuple[str, str]], *,
                raw_scores: bool = False) -> list[dict[str, float]]:
        """Per input, ``{label: score}`` (softmax probabilities unless ``raw_scores``), best first."""
        return [dict(row) for row in self.compute(inputs, raw_scores=raw_scores).top()]

    def inputs_request(self, inputs: list[str] | list[tuple[str, str]], *, raw_scores: bool,
                       truncate: bool) -> PrepareFn:
        """Texts or (text, text_pair) pairs: the classifier takes both, but not mixed in one call."""
        items: list[Any] = list(inputs)
        if items and all(isinstance(x, (tuple, list)) for x in items):
            return functools.partial(self.model.prepare_pair_list, items, truncate=truncate,
                                     raw_scores=raw_scores)
        return functools.partial(self.model.prepare_texts, items, truncate=truncate, raw_scores=raw_scores)

    @property
    def labels(self) -> list[str]:
        return self.model.labels


_CLASS_FOR = {"rerank": "Reranker", "embed": "Embedder", "classify": "Classifier"}

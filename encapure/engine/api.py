"""The synchronous user API: ``Reranker``, ``Embedder``, ``Classifier``.

Thin wrappers over ``OnnxModel``: prepare -> batched run -> finish, in the caller's thread (or on
the model's small worker pool when ``Settings.workers > 1``). The async API and the server use the
scheduler instead, with the same model object underneath.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import numpy.typing as npt

from encapure.engine.loading import load_model
from encapure.engine.model import OnnxModel
from encapure.engine.types import ClassifyOutput, EmbedOutput, LongDocuments, RerankOutput, RerankResult
from encapure.errors import InvalidInputError, WrongTaskError
from encapure.manifest import Task
from encapure.settings import Precision, Settings


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
    ) -> list[RerankResult]:
        """Documents sorted by relevance to ``query`` (ties keep input order), cut to ``top_n``."""
        if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 0):
            raise InvalidInputError(f"top_n must be a non-negative integer, got {top_n!r}")
        out = self.compute(query, documents, raw_scores=raw_scores, truncate=truncate,
                           long_documents=long_documents)
        return out.ranked(top_n, list(documents) if return_documents else None)

    def compute(
        self,
        query: str,
        documents: list[str],
        *,
        raw_scores: bool = False,
        truncate: bool = True,
        long_documents: LongDocuments = "truncate",
    ) -> RerankOutput:
        """Scores in input order, with token counts and truncation flags."""
        prepared = self.model.prepare_pairs(query, documents, truncate=truncate,
                                            long_documents=long_documents, raw_scores=raw_scores)
        out = self.model(prepared)
        assert isinstance(out, RerankOutput)
        return out

    def score(
        self,
        pairs: list[tuple[str, str]],
        *,
        raw_scores: bool = False,
        truncate: bool = True,
        long_documents: LongDocuments = "truncate",
    ) -> npt.NDArray[np.float32]:
        """One score per (query, document) pair, in input order."""
        prepared = self.model.prepare_pair_list(pairs, truncate=truncate, long_documents=long_documents,
                                                raw_scores=raw_scores)
        out = self.model(prepared)
        assert isinstance(out, RerankOutput)
        return out.scores


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
        prepared = self.model.prepare_texts(texts, truncate=truncate, kind=kind, dimensions=dimensions,
                                            normalize=normalize)
        out = self.model(prepared)
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
        single = isinstance(texts, str)
        out = self.compute([texts] if single else texts, dimensions=dimensions,  # type: ignore[list-item,arg-type]
                           normalize=normalize, truncate=truncate).embeddings
        return out[0] if single else out

    def embed_query(self, texts: list[str] | str, *, dimensions: int | None = None) -> npt.NDArray[np.float32]:
        """With the model's query prefix (e5 ``query: ``, bge's retrieval instruction)."""
        single = isinstance(texts, str)
        out = self.compute([texts] if single else texts, kind="query",  # type: ignore[list-item,arg-type]
                           dimensions=dimensions).embeddings
        return out[0] if single else out

    def embed_documents(self, texts: list[str], *, dimensions: int | None = None) -> npt.NDArray[np.float32]:
        """With the model's document prefix (e5 ``passage: ``)."""
        return self.compute(texts, kind="document", dimensions=dimensions).embeddings

    @property
    def dimension(self) -> int:
        return self.model.output_dim


class Classifier(_Base):
    task: ClassVar[Task] = "classify"

    def compute(self, inputs: list[str] | list[tuple[str, str]], *, raw_scores: bool = False,
                truncate: bool = True) -> ClassifyOutput:
        items = list(inputs)
        if items and all(isinstance(x, (tuple, list)) for x in items):
            prepared = self.model.prepare_pair_list(items, truncate=truncate,  # type: ignore[arg-type]
                                                    raw_scores=raw_scores)
        else:
            prepared = self.model.prepare_texts(items, truncate=truncate,  # type: ignore[arg-type]
                                                raw_scores=raw_scores)
        out = self.model(prepared)
        assert isinstance(out, ClassifyOutput)
        return out

    def predict(self, inputs: list[str] | list[tuple[str, str]], *,
                raw_scores: bool = False) -> list[dict[str, float]]:
        """Per input, ``{label: score}`` (softmax probabilities unless ``raw_scores``), best first."""
        return [dict(row) for row in self.compute(inputs, raw_scores=raw_scores).top()]

    @property
    def labels(self) -> list[str]:
        return self.model.labels


_CLASS_FOR = {"rerank": "Reranker", "embed": "Embedder", "classify": "Classifier"}

"""The contract between the engine and whoever drives it (its own sync API, the scheduler).

The pipeline is pre-process -> run -> post-process, split so that a scheduler can pool the
*units* of many requests into shared batches:

1. ``model.prepare_pairs`` / ``model.prepare_texts`` tokenize one request into ``Prepared``:
   a list of ``Unit`` (one tokenized sequence each; a long document may give several windows)
   and ``owners`` (which input each unit belongs to).
2. ``plan_batches`` (pure) cuts any list of unit lengths into batches by a padded-token budget.
3. ``model.forward(units)`` runs one batch and returns one raw row per unit
   (rerank/classify: logits ``[B, n_labels]``; embed: pooled, *unnormalized* ``[B, D]``).
   Thread-safe: several threads may call it at once.
4. ``model.finish(prepared, rows)`` folds rows back per input (max over windows), applies
   activation / normalization / dimensions (request options travel in ``Prepared.options``, set
   at prepare time, so the scheduler never needs them) and returns the request's result:
   ``RerankOutput`` / ``EmbedOutput`` / ``ClassifyOutput`` / ``MultiVectorOutput``.

Token-level units (ColBERT, ``/embed_all``) make ``forward`` return a 1-D object array of
``[n_tokens, D]`` arrays instead of a float matrix: rows of different lengths cannot share one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from encapure.manifest import Manifest, Task

LongDocuments = Literal["truncate", "window", "error"]
Side = Literal["left", "right"]


@dataclass(slots=True)
class Unit:
    """One tokenized sequence, ready to pad into a batch."""

    ids: npt.NDArray[np.int64]
    type_ids: npt.NDArray[np.int64] | None = None
    # Per-token attention when it is not "every token": ColBERT's query expansion feeds [MASK]
    # tokens whose keys are masked. None = all ones.
    attention: npt.NDArray[np.int64] | None = None
    # The unit wants its token rows back ([n_tokens, D]) rather than a pooled row (``/embed_all``).
    token_level: bool = False

    def __len__(self) -> int:
        return int(self.ids.shape[0])


@dataclass
class Prepared:
    """A request after tokenization."""

    units: list[Unit]
    owners: npt.NDArray[np.int64]  # len(units): index of the input each unit belongs to
    n_inputs: int
    tokens: list[int]  # per input: tokens fed to the model (summed over its windows)
    truncated: list[bool]  # per input: whether any text was cut to fit
    options: dict[str, Any] = field(default_factory=dict)  # post-processing options of the request

    @property
    def total_tokens(self) -> int:
        return int(sum(self.tokens))


@dataclass(slots=True)
class RerankResult:
    """One ranked document: ``index`` is its position in the caller's list."""

    index: int
    score: float
    document: str | None = None
    tokens: int = 0
    truncated: bool = False


@dataclass
class RerankOutput:
    """Scores of every (query, document) pair in input order.

    ``scores`` are sigmoid probabilities unless the request asked for ``raw_scores`` (then logits);
    ``tokens`` and ``truncated`` report what the model actually saw per input.
    """

    scores: npt.NDArray[np.float32]  # [n]
    tokens: list[int]
    truncated: list[bool]
    raw: bool = False

    def ranked(self, top_n: int | None = None, documents: list[str] | None = None) -> list[RerankResult]:
        """Results sorted by score (ties keep input order), cut to ``top_n``."""
        order = np.argsort(-self.scores, kind="stable")
        if top_n is not None:
            order = order[: max(0, top_n)]
        return [
            RerankResult(
                index=int(i),
                score=float(self.scores[i]),
                document=documents[i] if documents is not None else None,
                tokens=self.tokens[i],
                truncated=self.truncated[i],
            )
            for i in order
        ]


@dataclass
class EmbedOutput:
    """One float32 vector per input text, in input order (``[n, D]``; D after ``dimensions``)."""

    embeddings: npt.NDArray[np.float32]
    tokens: list[int]
    truncated: list[bool]


@dataclass
class ClassifyOutput:
    """Per-input scores over ``labels`` (softmax probabilities unless raw)."""

    scores: npt.NDArray[np.float32]  # [n, n_labels]
    labels: list[str]
    tokens: list[int]
    truncated: list[bool]
    raw: bool = False

    def top(self) -> list[list[tuple[str, float]]]:
        """Per input, (label, score) sorted best first."""
        out = []
        for row in self.scores:
            order = np.argsort(-row, kind="stable")
            out.append([(self.labels[j], float(row[j])) for j in order])
        return out


@dataclass
class MultiVectorOutput:
    """Per input text, its token vectors ``[n_tokens, D]`` (float32), in input order.

    ColBERT models: projected, L2-normalized vectors without padding (and, for documents, without
    the punctuation skip-list), ready for ``maxsim``. Other embedding models: the rows of the last
    hidden state, special tokens included (TEI's ``/embed_all``).
    """

    vectors: list[npt.NDArray[np.float32]]
    tokens: list[int]
    truncated: list[bool]


ModelOutput = RerankOutput | EmbedOutput | ClassifyOutput | MultiVectorOutput


@runtime_checkable
class InferenceModel(Protocol):
    """A loaded model, as the HTTP layer and the user APIs see it. Implemented by
    ``encapure.engine.model.OnnxModel``. The scheduler needs only ``forward`` (its one-method
    ``encapure.scheduler.workers.Runner``)."""

    name: str
    manifest: Manifest

    @property
    def task(self) -> Task: ...

    @property
    def max_length(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    def encode_batch(self, items: list[Any], mode: str = "raw", *, add_special_tokens: bool = True) -> list[Any]:
        """The model's own tokenizer; mode: raw (no truncation), single, pair, pair_both, pair_window."""
        ...

    def decode(self, ids: list[int], *, skip_special_tokens: bool = True) -> str: ...

    def prepare_pairs(
        self,
        query: str,
        documents: list[str],
        *,
        truncate: bool = True,
        long_documents: LongDocuments = "truncate",
        raw_scores: bool = False,
        instruction: str | None = None,
    ) -> Prepared: ...

    def prepare_pair_list(
        self,
        pairs: list[tuple[str, str]],
        *,
        truncate: bool = True,
        long_documents: LongDocuments = "truncate",
        raw_scores: bool = False,
        instruction: str | None = None,
    ) -> Prepared: ...

    def prepare_texts(
        self,
        texts: list[str],
        *,
        truncate: bool = True,
        kind: Literal["query", "document"] | None = None,
        dimensions: int | None = None,
        normalize: bool | None = None,
        raw_scores: bool = False,
    ) -> Prepared: ...

    def prepare_multivector(
        self,
        texts: list[str],
        *,
        kind: Literal["query", "document"] | None = None,
        truncate: bool = True,
    ) -> Prepared: ...

    def forward(self, units: list[Unit]) -> npt.NDArray[np.float32]: ...

    def finish(self, prepared: Prepared, rows: npt.NDArray[np.float32]) -> ModelOutput: ...

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
4. ``model.finish(prepared, rows, options)`` folds rows back per input (max over windows),
   applies activation / normalization / dimensions and returns the request's result.
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


@runtime_checkable
class InferenceModel(Protocol):
    """A loaded model. Implemented by ``encapure.engine.model.OnnxModel``."""

    name: str
    manifest: Manifest

    @property
    def task(self) -> Task: ...

    @property
    def max_length(self) -> int: ...

    def prepare_pairs(
        self,
        query: str,
        documents: list[str],
        *,
        truncate: bool = True,
        long_documents: LongDocuments = "truncate",
    ) -> Prepared: ...

    def prepare_texts(
        self,
        texts: list[str],
        *,
        truncate: bool = True,
        kind: Literal["query", "document"] | None = None,
    ) -> Prepared: ...

    def forward(self, units: list[Unit]) -> npt.NDArray[np.float32]: ...

    def finish(self, prepared: Prepared, rows: npt.NDArray[np.float32]) -> Any: ...

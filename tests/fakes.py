"""Stand-in models: the real engine path (tokenizer, batching, padding, folding, activation) over a
fake ONNX Runtime session, so scheduler and HTTP tests need no model file, no export and no torch.

``FakeSession`` answers the three calls ``OnnxModel`` makes of an ``onnxruntime.InferenceSession``
(``get_inputs``, ``get_outputs``, ``run``). What it computes is a fixed function of each row's own
token ids and positions, so a row's output never depends on its batch-mates or on padding: a
response that took a wrong row, or a batch that leaked padding into a result, gives a different
number. Padded positions of token outputs are filled with a large value for the same reason.

It costs what you ask: ``base_s + per_token_s x padded tokens`` per batch, plus ``stall_s`` for
each occurrence of the word ``stall`` in the batch's most stalled row (a slow request on demand),
and a batch holding the word ``explode`` fails as ONNX Runtime would (a failing request on demand).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from conftest import RERANKER_FIXTURE, need

from encapure.engine.model import OnnxModel
from encapure.manifest import Manifest
from encapure.settings import Settings

STALL_WORD = "stall"
FAIL_WORD = "explode"
PAD_FILL = 1000.0  # what a token output holds at padded positions: any leak shows
MAX_POSITIONS = 512
INPUTS = ["input_ids", "attention_mask", "token_type_ids"]


@dataclass(frozen=True)
class Port:
    """The two fields of an ``onnxruntime.NodeArg`` that the engine reads."""

    name: str
    shape: list[Any]


class FakeSession:
    """Deterministic, batch-independent outputs at a chosen cost; records the batches it ran."""

    def __init__(
        self,
        kind: Literal["logits", "token_embeddings"],
        *,
        vocab_size: int,
        dim: int = 1,
        base_s: float = 0.0,
        per_token_s: float = 0.0,
        stall_id: int | None = None,
        stall_s: float = 0.0,
        fail_id: int | None = None,
        seed: int = 0,
    ) -> None:
        self.kind = kind
        self.dim = dim
        self.base_s = base_s
        self.per_token_s = per_token_s
        self.stall_id = stall_id
        self.stall_s = stall_s
        self.fail_id = fail_id
        rng = np.random.default_rng(seed)
        self._tokens = rng.standard_normal((vocab_size, dim))
        self._positions = rng.standard_normal((MAX_POSITIONS, dim))
        self._lock = threading.Lock()
        self.batches: list[tuple[int, int]] = []  # (rows, padded width) of every run

    def get_inputs(self) -> list[Port]:
        return [Port(n, ["batch", "sequence"]) for n in INPUTS]

    def get_outputs(self) -> list[Port]:
        if self.kind == "logits":
            return [Port("logits", ["batch", self.dim])]
        return [Port("token_embeddings", ["batch", "sequence", self.dim])]

    def row(self, ids: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
        """One unpadded row's output: per-token vectors (embeddings) or one logit vector."""
        tokens = self._tokens[ids] + 0.5 * self._positions[: len(ids)]
        if self.kind == "token_embeddings":
            return tokens
        return tokens.sum(axis=0) / np.sqrt(len(ids))

    def run(self, output_names: list[str], feed: dict[str, npt.NDArray[np.int64]]) -> list[npt.NDArray[np.float32]]:
        ids = feed["input_ids"]
        n, width = ids.shape
        lengths = feed["attention_mask"].sum(axis=1) if "attention_mask" in feed else np.full(n, width)
        rows = [ids[i, : lengths[i]] for i in range(n)]
        with self._lock:
            self.batches.append((n, width))
        if self.fail_id is not None and any((r == self.fail_id).any() for r in rows):
            raise RuntimeError("fake model: this batch fails on purpose")
        stall = max(int((r == self.stall_id).sum()) for r in rows) if self.stall_id is not None else 0
        time.sleep(self.base_s + self.per_token_s * n * width + self.stall_s * stall)
        if self.kind == "logits":
            out = np.stack([self.row(r) for r in rows]).astype(np.float32)
        else:
            out = np.full((n, width, self.dim), PAD_FILL, dtype=np.float32)
            for i, r in enumerate(rows):
                out[i, : len(r)] = self.row(r)
        return [out]


def fake_model(
    task: Literal["rerank", "embed"] = "rerank",
    *,
    name: str | None = None,
    settings: Settings | None = None,
    dim: int = 128,
    max_length: int = 256,
    base_s: float = 0.0,
    per_token_s: float = 0.0,
    stall_s: float = 0.0,
    seed: int = 0,
) -> OnnxModel:
    """An ``OnnxModel`` over a ``FakeSession`` and the reranker fixture's real BERT tokenizer.

    A reranker gives one sigmoid-activated logit; an embedder token vectors that the engine
    mean-pools and L2-normalizes, like the exported models the tests used before.
    """
    tokenizer = need(RERANKER_FIXTURE) / "tokenizer.json"
    rerank = task == "rerank"
    manifest = Manifest(
        task=task,
        precision="fp32",
        max_length=max_length,
        input_names=list(INPUTS),
        output_name="logits" if rerank else "token_embeddings",
        output_kind="logits" if rerank else "token_embeddings",
        pooling=None if rerank else "mean",
        normalize=not rerank,
        labels=["LABEL_0"] if rerank else None,
        score_activation="sigmoid" if rerank else "none",
        embedding_dim=None if rerank else dim,
        source=f"fake-{task}",
        architecture="FakeSession",
        model_type="bert",
    )
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer))
    session = FakeSession(
        "logits" if rerank else "token_embeddings",
        vocab_size=tok.get_vocab_size(),
        dim=1 if rerank else dim,
        base_s=base_s,
        per_token_s=per_token_s,
        stall_id=tok.token_to_id(STALL_WORD),
        stall_s=stall_s,
        fail_id=tok.token_to_id(FAIL_WORD),
        seed=seed,
    )
    return OnnxModel(
        tokenizer.parent, manifest, settings=settings, name=name, tokenizer_path=tokenizer, session=session
    )


def fake_session(model: OnnxModel) -> FakeSession:
    session = model.session
    assert isinstance(session, FakeSession)
    return session

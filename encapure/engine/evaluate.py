"""Quality and throughput of a reranker on a labelled dataset (what ``encapure eval`` prints)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from encapure.engine.api import Reranker
from encapure.engine.datasets import QueryGroup
from encapure.engine.metrics import RankingMetrics, evaluate


@dataclass
class EvalResult:
    metrics: RankingMetrics
    pairs: int
    tokens: int
    truncated: int
    seconds: float
    scores: list[np.ndarray]  # per query, in candidate order

    @property
    def pairs_per_s(self) -> float:
        return self.pairs / self.seconds if self.seconds > 0 else float("nan")


def score_groups(reranker: Reranker, groups: list[QueryGroup], *, chunk: int = 4096) -> tuple[list[np.ndarray], int, int]:
    """Scores per group; all pairs go through the batcher together so batches fill up."""
    pairs = [(g.query, d) for g in groups for d in g.documents]
    scores = np.empty(len(pairs), dtype=np.float32)
    tokens = truncated = 0
    model = reranker.model
    for start in range(0, len(pairs), chunk):
        prepared = model.prepare_pair_list(pairs[start : start + chunk], raw_scores=True)
        out = model(prepared)
        scores[start : start + len(prepared.tokens)] = out.scores  # type: ignore[union-attr]
        tokens += prepared.total_tokens
        truncated += sum(prepared.truncated)
    per_group = []
    pos = 0
    for g in groups:
        per_group.append(scores[pos : pos + len(g.documents)])
        pos += len(g.documents)
    return per_group, tokens, truncated


def evaluate_reranker(reranker: Reranker, groups: list[QueryGroup]) -> EvalResult:
    t0 = time.perf_counter()
    per_group, tokens, truncated = score_groups(reranker, groups)
    seconds = time.perf_counter() - t0
    metrics = evaluate([(g.labels, s) for g, s in zip(groups, per_group, strict=True)])
    return EvalResult(metrics, sum(len(g.documents) for g in groups), tokens, truncated, seconds, per_group)

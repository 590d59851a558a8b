"""Quality and throughput of a reranker on a labelled dataset (what ``encapure eval`` prints).

Evaluation sits above the engine: it drives a ``Reranker`` like any caller would, and the engine
imports nothing from here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from encapure.engine.api import Reranker
from encapure.evaluation.datasets import QueryGroup
from encapure.evaluation.ranking import RankingMetrics, evaluate_flat, split_flat


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


def score_groups(reranker: Reranker, groups: list[QueryGroup], *, chunk: int = 4096) -> tuple[np.ndarray, int, int]:
    """Raw scores of all pairs, flat in group order, plus tokens and truncated pairs.

    All pairs go through the batcher together (in chunks, to bound memory) so batches fill up the
    way they do under load, instead of one small batch per query.
    """
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
    return scores, tokens, truncated


def evaluate_reranker(reranker: Reranker, groups: list[QueryGroup]) -> EvalResult:
    """Scores every group's candidates and ranks them; the time covers tokenizing and inference."""
    t0 = time.perf_counter()
    scores, tokens, truncated = score_groups(reranker, groups)
    seconds = time.perf_counter() - t0
    labels = [g.labels for g in groups]
    metrics = evaluate_flat(labels, scores)
    return EvalResult(metrics, len(scores), tokens, truncated, seconds, split_flat(scores, labels))

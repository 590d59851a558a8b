"""Ranking metrics, pure functions (no model, no I/O) so they can be tested against hand counts.

The one MAP/MRR/P@1/NDCG implementation of the project: ``encapure eval``, the benchmarks, the
tests and the experiments all rank through here, so their numbers are comparable.

Conventions (the usual TREC / WikiQA ones):
- candidates are ranked by score descending; ties keep the candidates' input order (stable sort),
  so results never depend on sort implementation details;
- a label > 0 is relevant; NDCG uses the label itself as graded gain (2^rel - 1);
- queries without any relevant candidate are skipped by every metric (WikiQA's standard
  "MAP over questions with at least one correct answer"); the count of skipped queries is reported.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def ranking(scores: Sequence[float] | np.ndarray) -> np.ndarray:
    """Candidate indices, best first; ties keep input order."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")


def average_precision(labels: Sequence[float] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    rel = np.asarray(labels, dtype=np.float64)[ranking(scores)] > 0
    if not rel.any():
        return 0.0
    hits = np.cumsum(rel)
    ranks = np.arange(1, rel.size + 1)
    return float((hits[rel] / ranks[rel]).sum() / rel.sum())


def reciprocal_rank(labels: Sequence[float] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    rel = np.asarray(labels, dtype=np.float64)[ranking(scores)] > 0
    first = np.flatnonzero(rel)
    return float(1.0 / (first[0] + 1)) if first.size else 0.0


def precision_at(labels: Sequence[float] | np.ndarray, scores: Sequence[float] | np.ndarray, k: int) -> float:
    rel = np.asarray(labels, dtype=np.float64)[ranking(scores)][:k] > 0
    return float(rel.sum() / k)


def ndcg_at(labels: Sequence[float] | np.ndarray, scores: Sequence[float] | np.ndarray, k: int) -> float:
    gains = np.maximum(np.asarray(labels, dtype=np.float64), 0.0)
    ranked = gains[ranking(scores)][:k]
    ideal = np.sort(gains)[::-1][:k]
    disc = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = float(((2.0**ranked - 1.0) * disc[: ranked.size]).sum())
    idcg = float(((2.0**ideal - 1.0) * disc[: ideal.size]).sum())
    return dcg / idcg if idcg > 0 else 0.0


@dataclass
class RankingMetrics:
    map: float
    mrr: float
    p_at_1: float
    ndcg_at_10: float
    queries: int  # evaluated (>= 1 relevant candidate)
    skipped: int  # without any relevant candidate

    def as_dict(self) -> dict[str, float | int]:
        return {"MAP": self.map, "MRR": self.mrr, "P@1": self.p_at_1, "NDCG@10": self.ndcg_at_10,
                "queries": self.queries, "skipped": self.skipped}


def evaluate(per_query: Sequence[tuple[Sequence[float] | np.ndarray, Sequence[float] | np.ndarray]]) -> RankingMetrics:
    """Mean metrics over queries given as (labels, scores) of their candidates."""
    aps: list[float] = []
    rrs: list[float] = []
    p1s: list[float] = []
    ndcgs: list[float] = []
    skipped = 0
    for labels, scores in per_query:
        if len(labels) != len(scores):
            raise ValueError("labels and scores differ in length")
        if not any(label > 0 for label in labels):
            skipped += 1
            continue
        aps.append(average_precision(labels, scores))
        rrs.append(reciprocal_rank(labels, scores))
        p1s.append(precision_at(labels, scores, 1))
        ndcgs.append(ndcg_at(labels, scores, 10))

    def mean(x: list[float]) -> float:
        return float(sum(x) / len(x)) if x else math.nan

    return RankingMetrics(mean(aps), mean(rrs), mean(p1s), mean(ndcgs), len(aps), skipped)


def split_flat(scores: Sequence[float] | np.ndarray, labels_per_query: Sequence[Sequence[float]]) -> list[np.ndarray]:
    """Cuts one flat score array (all queries' candidates, query after query) into per-query arrays."""
    flat = np.asarray(scores)
    sizes = [len(labels) for labels in labels_per_query]
    if flat.shape[0] != sum(sizes):
        raise ValueError(f"{flat.shape[0]} scores for {sum(sizes)} candidates")
    return np.split(flat, np.cumsum(sizes)[:-1]) if sizes else []


def evaluate_flat(labels_per_query: Sequence[Sequence[float]], scores: Sequence[float] | np.ndarray) -> RankingMetrics:
    """``evaluate`` for scores returned flat, the way a batch scorer returns all pairs of a dataset."""
    return evaluate(list(zip(labels_per_query, split_flat(scores, labels_per_query), strict=True)))

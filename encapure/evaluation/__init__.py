"""Evaluation of rankers: dataset readers, ranking metrics, ``run`` (scores a ``Reranker``) and ``cli`` (``encapure eval``).

A layer above the engine: it calls the engine like any user, and the engine never imports it.
``datasets`` and ``ranking`` need only numpy, so the benchmarks and experiments use them without
loading ONNX Runtime; ``encapure.evaluation.run`` (which does) is imported explicitly.
"""

from __future__ import annotations

from encapure.evaluation.datasets import QueryGroup, load_dataset, mixed_texts, pairs, text_pool
from encapure.evaluation.ranking import (
    RankingMetrics,
    average_precision,
    evaluate,
    evaluate_flat,
    ndcg_at,
    precision_at,
    ranking,
    reciprocal_rank,
    split_flat,
)

__all__ = [
    "QueryGroup",
    "RankingMetrics",
    "average_precision",
    "evaluate",
    "evaluate_flat",
    "load_dataset",
    "mixed_texts",
    "ndcg_at",
    "pairs",
    "precision_at",
    "ranking",
    "reciprocal_rank",
    "split_flat",
    "text_pool",
]

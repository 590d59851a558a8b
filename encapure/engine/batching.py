"""Batch planning: a pure function so the engine and the scheduler cut batches the same way.

Transformer cost grows with padded tokens (batch size x longest item), so mixing a 20-token and a
250-token item in one batch wastes most of the work on padding. Sorting by length and cutting by a
padded-token budget keeps every batch nearly rectangular.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def plan_batches(
    lengths: Sequence[int] | np.ndarray,
    max_batch_tokens: int,
    max_batch_size: int,
) -> list[list[int]]:
    """Group item indices into batches, longest first.

    Each batch holds at most ``max_batch_size`` items and, unless a single item alone exceeds it,
    at most ``max_batch_tokens`` padded tokens (items x longest item). Every index appears exactly
    once. Longest-first puts the most expensive batch at the front, so a deadline problem shows up
    early rather than after the cheap work is done.
    """
    if max_batch_tokens <= 0 or max_batch_size <= 0:
        raise ValueError("max_batch_tokens and max_batch_size must be positive")
    arr = np.asarray(lengths, dtype=np.int64)
    n = int(arr.shape[0])
    if n == 0:
        return []
    # Stable sort on the negated length: ties keep input order (deterministic plans).
    order = np.argsort(-arr, kind="stable")
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for idx in order.tolist():
        length = max(1, int(arr[idx]))
        # Sorted descending, so the first item of a batch is its longest.
        if current and (len(current) + 1 > max_batch_size or (len(current) + 1) * longest > max_batch_tokens):
            batches.append(current)
            current = []
        if not current:
            longest = length
        current.append(idx)
    if current:
        batches.append(current)
    return batches


def naive_batches(n: int, batch_size: int) -> list[list[int]]:
    """Fixed-size batches in input order: the baseline the planner is measured against."""
    return [list(range(i, min(n, i + batch_size))) for i in range(0, n, batch_size)]

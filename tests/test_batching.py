"""Batch planning properties (pure function, no model)."""

from __future__ import annotations

import random

import pytest

from encapure.engine.batching import naive_batches, plan_batches


def _check(lengths: list[int], budget: int, size: int) -> list[list[int]]:
    batches = plan_batches(lengths, budget, size)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))  # every item exactly once
    for b in batches:
        assert 1 <= len(b) <= size
        longest = max(max(1, lengths[i]) for i in b)
        # Over budget only when one item alone is bigger than the budget.
        assert len(b) * longest <= budget or len(b) == 1
    return batches


@pytest.mark.parametrize("seed", range(20))
def test_random_plans_respect_limits(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(1, 400)
    lengths = [rng.randint(1, 512) for _ in range(n)]
    budget = rng.choice([64, 512, 2048, 16384])
    size = rng.choice([1, 3, 32, 64])
    batches = _check(lengths, budget, size)
    # Sorted longest first: batch maxima never increase.
    maxima = [max(lengths[i] for i in b) for b in batches]
    assert maxima == sorted(maxima, reverse=True)


def test_similar_lengths_share_batches() -> None:
    lengths = [10, 200, 11, 201, 12, 199]
    batches = plan_batches(lengths, 400, 64)
    assert [sorted(b) for b in batches] == [[1, 3], [5], [0, 2, 4]] or all(
        len({lengths[i] > 100 for i in b}) == 1 for b in batches
    )
    for b in batches:  # long and short never mixed
        assert len({lengths[i] > 100 for i in b}) == 1


def test_padded_tokens_not_more_than_naive() -> None:
    rng = random.Random(1)
    lengths = [rng.choice([8, 16, 500]) for _ in range(256)]

    def padded(batches: list[list[int]]) -> int:
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    planned = padded(plan_batches(lengths, 32 * 512, 32))
    naive = padded(naive_batches(len(lengths), 32))
    assert planned < naive / 2


def test_ties_keep_input_order_and_oversized_item_alone() -> None:
    assert plan_batches([5, 5, 5], 100, 2) == [[0, 1], [2]]
    assert plan_batches([1000, 3, 3], 100, 64) == [[0], [1, 2]]
    assert plan_batches([], 100, 8) == []
    assert plan_batches([0, 0], 10, 8) == [[0, 1]]


def test_bad_limits() -> None:
    with pytest.raises(ValueError):
        plan_batches([1], 0, 4)
    with pytest.raises(ValueError):
        plan_batches([1], 4, 0)

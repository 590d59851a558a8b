"""The batching policy as a table: queued lengths and ages in, the next batch out.

No threads, no event loop, no model: ``next_batch`` is a pure function, so every rule of
``encapure.scheduler.policy`` (window, token budget, batch size, waiting for company, oldest first,
sharing a lone request among idle workers) is one row here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from encapure.scheduler.policy import (
    WINDOW_BATCHES,
    Decision,
    Limits,
    fair_order,
    heavy_may_run,
    is_heavy,
    next_batch,
)

WAIT = 0.002  # max_wait_s of every case unless it says otherwise


@dataclass
class Case:
    id: str
    lengths: list[int]
    want: Decision
    waited: float | list[float] = 0.0  # one age for every unit, or one per unit
    idle: int = 1
    preparing: bool = False
    tokens: int = 10_000
    size: int = 32
    split: bool = True
    max_wait: float = WAIT
    queued: int | None = None  # the whole queue's length when ``lengths`` is only its oldest part
    note: str = field(default="", repr=False)


def take(*idx: int) -> Decision:
    return Decision(take=idx)


CASES = [
    Case("empty queue", [], Decision()),
    Case("no idle worker", [10, 20], Decision(), idle=0),
    Case("one short and one long request share a batch", [8, 120], take(0, 1)),
    Case(
        "a lone request waits for one being tokenized",
        [8, 120],
        Decision(wait_s=WAIT - 0.0005),
        waited=0.0005,
        preparing=True,
    ),
    Case("...but not past max_wait", [8, 120], take(0, 1), waited=WAIT, preparing=True),
    Case("max_wait 0 never waits", [8, 120], take(0, 1), preparing=True, max_wait=0.0),
    # budget 400 padded tokens: the four 100s fill one batch, the four 10s another
    Case(
        "budget cut: the biggest batch goes first (ties: the plan's first, longest)",
        [10, 10, 10, 10, 100, 100, 100, 100],
        take(4, 5, 6, 7),
        tokens=400,
    ),
    Case(
        "budget cut: once the oldest waited max_wait, its batch goes",
        [10, 10, 10, 10, 100, 100, 100, 100],
        take(0, 1, 2, 3),
        waited=WAIT,
        tokens=400,
    ),
    Case(
        "a full window goes at once even while another request is tokenized",
        [10, 10, 10, 10, 100, 100, 100, 100],
        take(4, 5, 6, 7),
        preparing=True,
        tokens=400,
    ),
    Case(
        "oldest first: the long oldest unit and its batch-mate",
        [100, 10, 10, 10, 10],
        take(0, 1),
        waited=[WAIT, WAIT, 0.0, 0.0, 0.0],
        tokens=200,
    ),
    Case(
        "not yet old: the bigger batch of short units goes first",
        [100, 10, 10, 10, 10],
        take(2, 3, 4),
        waited=[WAIT / 2, WAIT / 2, 0.0, 0.0, 0.0],
        tokens=200,
    ),
    Case("max batch size", [5] * 10, take(0, 1, 2, 3), size=4),
    Case(
        "only the window is planned: a unit past it waits its turn",
        [5] * (2 * WINDOW_BATCHES) + [1],
        take(0, 1),
        size=2,
        note="the 1-token unit behind the window would otherwise make the first batch",
    ),
    Case(
        "more queued behind the given window: full, no waiting, no split",
        [10] * 8,
        take(*range(8)),
        idle=2,
        preparing=True,
        queued=500,
    ),
    Case("two idle workers share a lone request", [10] * 16, take(*range(8)), idle=2),
    Case(
        "split by tokens, longest first",
        [10, 10, 50, 10, 10, 10, 10, 10],
        take(2, 0),
        idle=2,
    ),
    Case("no split when it is switched off", [10] * 16, take(*range(16)), idle=2, split=False),
    Case("small requests are split too: 6 units on 3 idle workers, 2 a part", [10] * 6, take(0, 1), idle=3),
    Case("2 units on 2 idle workers: one each", [30, 10], take(0), idle=2),
    Case("a lone unit is not split", [10], take(0), idle=3),
    Case("parts never outnumber idle workers", [10] * 30, take(*range(10)), idle=3),
    Case("a full window is not split", [10] * 40, take(*range(32)), idle=3),
    Case("no split while another request is tokenized", [10] * 16, take(*range(16)), idle=2,
         waited=WAIT, preparing=True),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_next_batch(case: Case) -> None:
    waited = case.waited if isinstance(case.waited, list) else [case.waited] * len(case.lengths)
    limits = Limits(
        max_batch_tokens=case.tokens, max_batch_size=case.size, max_wait_s=case.max_wait, split_idle=case.split
    )
    got = next_batch(
        case.lengths, waited, idle_workers=case.idle, preparing=case.preparing, limits=limits, queued=case.queued
    )
    assert got.take == case.want.take
    if case.want.wait_s is None:
        assert got.wait_s is None
    else:
        assert got.wait_s == pytest.approx(case.want.wait_s)


def test_every_queued_unit_goes_out_exactly_once_within_limits() -> None:
    """Draining a queue decision by decision: nothing lost, nothing twice, every batch in budget."""
    lengths = [(i * 37) % 200 + 1 for i in range(300)]
    queue = list(range(len(lengths)))
    limits = Limits(max_batch_tokens=1024, max_batch_size=16, max_wait_s=0.0)
    sent: list[int] = []
    while queue:
        d = next_batch([lengths[u] for u in queue], [1.0] * len(queue), idle_workers=1, preparing=False,
                       limits=limits)
        assert d.take
        batch = [queue[i] for i in d.take]
        assert len(batch) <= 16
        assert len(batch) == 1 or len(batch) * max(lengths[u] for u in batch) <= 1024
        sent += batch
        picked = set(d.take)
        queue = [u for i, u in enumerate(queue) if i not in picked]
    assert sorted(sent) == list(range(len(lengths)))


# ------------------------------------------------------------------------- fairness between requests
@pytest.mark.parametrize(
    ("work_s", "waited_s", "want"),
    [
        ([5.0, 0.1, 0.2], [0.0, 0.0, 0.0], [1, 2, 0]),  # least remaining work first
        ([0.1, 0.1, 0.1], [0.0, 0.0, 0.0], [0, 1, 2]),  # ties keep admission order
        ([3.0, 0.1], [2.0, 0.0], [1, 0]),  # a heavy one that waited less than its work: still behind
        ([3.0, 0.1], [3.5, 0.0], [0, 1]),  # ...once it waited longer than its work, before newcomers
        ([1.0, 1.0, 0.5], [0.2, 0.9, 0.0], [1, 2, 0]),  # aging: same work, the longer wait first
        ([], [], []),
    ],
)
def test_fair_order(work_s: list[float], waited_s: list[float], want: list[int]) -> None:
    assert fair_order(work_s, waited_s) == want


def test_heavy_requests_never_take_the_last_free_worker() -> None:
    limits = Limits(max_batch_tokens=1000, max_batch_size=16, max_wait_s=0.0)
    assert not is_heavy(2000, limits) and is_heavy(2001, limits)
    assert heavy_may_run(0, 1) and heavy_may_run(5, 1)  # one worker: nothing to keep free
    assert heavy_may_run(0, 2) and not heavy_may_run(1, 2)
    assert heavy_may_run(2, 4) and not heavy_may_run(3, 4)


def test_the_batch_of_the_windows_first_unit_goes_when_someone_waited() -> None:
    """In fair order the first unit is the one to serve next, whichever unit is oldest."""
    limits = Limits(max_batch_tokens=200, max_batch_size=32, max_wait_s=WAIT)
    # a small request's units (first in fair order) before an older heavy request's long ones
    got = next_batch([10, 10, 100, 100], [0.0, 0.0, 1.0, 1.0], idle_workers=1, preparing=False, limits=limits)
    assert got.take == (0, 1)

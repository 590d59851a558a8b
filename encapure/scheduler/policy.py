"""The batching policy: which queued units go out next. A pure function, no threads, no clock.

Why it is separate: every rule about batch shape (token budget, window, waiting for company,
sharing a lone request among idle workers) lives here, so it can be read in one screen and tested
with tables of lengths and ages, without workers, models or an event loop.

The rules:

- Only the oldest ``WINDOW_BATCHES x max_batch_size`` queued units are considered, so a unit
  cannot be passed over for ever by newer, better-fitting ones.
- The engine's ``plan_batches`` (the one planner) cuts the window by ``max_batch_tokens`` (padded
  tokens) and ``max_batch_size``.
- A *full* window (more than one batch, or more queued behind it) sends a batch at once. A partial
  one waits for company up to ``max_wait_s``, but only while another request is being tokenized:
  with nothing on its way a lone request is never delayed.
- Once the oldest unit has waited ``max_wait_s`` (or nothing fuller is possible), the batch that
  holds it goes next; otherwise the biggest batch.
- With nothing else coming and several workers idle, the batch is cut so each idle worker gets a
  part of about equal tokens (longest first, at least ``MIN_SPLIT_UNITS`` units a part).

Fairness between requests (``fair_order``, ``heavy_may_run``): the window is not the oldest units
but the units of the requests in *fair order*: shortest remaining work first, aged by the time
waited (key = remaining work in seconds - waited seconds), so a small request is never stuck
behind a big one and a big one is not starved for ever: once it has waited as long as its own
work takes, it comes before any newcomer. A *heavy* request (more than ``HEAVY_BATCHES`` full
batches of work) runs on at most all workers but one, so a small request arriving meanwhile finds
a worker free instead of waiting for a long batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from encapure.engine.batching import plan_batches

# How many batches' worth of queued units (oldest first) one decision looks at.
WINDOW_BATCHES = 4
# A batch is shared among idle workers only if each part keeps at least this many units. One:
# measured on WikiQA at concurrency 1 (half its queries have < 8 candidates), sharing even 2-7
# units among the 2 single-thread workers took p50 from 40.8 to 32.2 ms (naive server: 35.8 ms);
# the extra session.run per part costs far less than running the batch on one thread.
MIN_SPLIT_UNITS = 1
# A request with more work than this many full batches (max_batch_tokens each) is heavy.
HEAVY_BATCHES = 2
# Seconds of remaining work one second of waiting makes up for in the fair order.
AGING = 1.0


@dataclass(frozen=True, slots=True)
class Limits:
    max_batch_tokens: int
    max_batch_size: int
    max_wait_s: float
    split_idle: bool = True


@dataclass(frozen=True, slots=True)
class Decision:
    """``take``: queue positions of the next batch (empty: send nothing now).
    ``wait_s``: when ``take`` is empty, how long until the decision should be made again."""

    take: tuple[int, ...] = ()
    wait_s: float | None = None


def window_size(limits: Limits) -> int:
    """How many of the oldest queued units one decision looks at."""
    return limits.max_batch_size * WINDOW_BATCHES


def next_batch(
    lengths: Sequence[int],
    waited_s: Sequence[float],
    *,
    idle_workers: int,
    preparing: bool,
    limits: Limits,
    queued: int | None = None,
) -> Decision:
    """The next batch for one idle worker, from one model's queue.

    ``lengths[i]`` and ``waited_s[i]`` describe the i-th queued unit, oldest first (admission
    order); they may stop after the first ``window_size(limits)`` units when ``queued`` gives the
    queue's whole length (a long queue need not be copied). ``preparing`` says whether another
    request is being tokenized right now.
    """
    if idle_workers <= 0 or not lengths:
        return Decision()
    size = limits.max_batch_size
    window = list(lengths[: window_size(limits)])
    if len(window) <= size and len(window) * max(window) <= limits.max_batch_tokens:
        plan = [list(range(len(window)))]  # it all fits one batch: nothing to plan
    else:
        plan = plan_batches(window, limits.max_batch_tokens, size)
    ages = waited_s[: len(window)]
    # position 0 is the unit that should go first (the queue's oldest, or the fair order's first)
    oldest = 0
    oldest_age = max(ages)
    full = len(plan) > 1 or len(window) < (len(lengths) if queued is None else queued)
    if not full and oldest_age < limits.max_wait_s and preparing:
        return Decision(wait_s=limits.max_wait_s - oldest_age)
    if oldest_age >= limits.max_wait_s or not full:
        chosen = next(b for b in plan if oldest in b)
    else:
        chosen = max(plan, key=len)
    parts = 1
    if not full and not preparing and limits.split_idle:
        # nothing else is coming and several workers idle: share the work for latency
        parts = max(1, min(idle_workers, len(chosen) // MIN_SPLIT_UNITS))
    if parts > 1:
        # longest units first; cut where this part holds about 1/parts of the tokens
        chosen = sorted(chosen, key=lambda i: -window[i])
        part_lens = [window[i] for i in chosen]
        target = sum(part_lens) / parts
        acc, k = 0, 0
        while k < len(part_lens) - 1 and acc + part_lens[k] <= target:
            acc += part_lens[k]
            k += 1
        chosen = chosen[: max(1, k)]
    return Decision(take=tuple(chosen))


def fair_order(work_s: Sequence[float], waited_s: Sequence[float], *, aging: float = AGING) -> list[int]:
    """Request positions in the order their units should be served: least remaining work (in
    seconds) minus ``aging`` x seconds waited first; ties keep admission order."""
    keys = [w - aging * a for w, a in zip(work_s, waited_s, strict=True)]
    return sorted(range(len(keys)), key=lambda i: (keys[i], i))


def is_heavy(work_tokens: float, limits: Limits) -> bool:
    """Whether a request's work is more than ``HEAVY_BATCHES`` full batches."""
    return work_tokens > HEAVY_BATCHES * limits.max_batch_tokens


def heavy_may_run(heavy_inflight: int, workers_alive: int) -> bool:
    """Whether another batch of a heavy request may start: never on the last free worker."""
    return workers_alive <= 1 or heavy_inflight < workers_alive - 1

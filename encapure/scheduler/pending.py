"""What the scheduler holds between admission and answer: requests, their queued units, batches.

All of it is touched on the event loop thread only; a worker reads the batch it was handed (and
each unit's ``req.done``, a benign race: a stale read only costs one wasted row).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from encapure.engine.types import Prepared, Unit


@dataclass(eq=False)
class Request:
    model: str
    prepared: Prepared
    future: asyncio.Future[npt.NDArray[np.float32]]
    deadline: float
    is_cancelled: Callable[[], bool] | None
    admitted: float
    n_units: int
    remaining: int
    rows: npt.NDArray[np.float32] | None = None
    done: bool = False
    drop_reason: str = "error"
    timer: asyncio.TimerHandle | None = None
    queued: int = 0  # units still in the queue (not yet handed to a worker)
    first_start: float = math.inf
    last_start: float = 0.0
    forward_s: float = 0.0
    batches: int = 0
    timings: dict[str, float] | None = None


@dataclass(eq=False, slots=True)
class Item:
    """One queued unit: which request, which of its units, how long."""

    req: Request
    index: int
    length: int

    @property
    def unit(self) -> Unit:
        return self.req.prepared.units[self.index]


@dataclass(eq=False)
class Batch:
    model: str
    items: list[Item]
    ran: list[Item] = field(default_factory=list)  # set by the worker: the items it computed
    started: float = 0.0
    elapsed: float = 0.0

    def requests(self) -> list[Request]:
        """The distinct requests with units in this batch."""
        return list({id(it.req): it.req for it in self.items}.values())


class PendingUnits:
    """Per model, the queued units in admission order (oldest first)."""

    def __init__(self, models: Sequence[str]) -> None:
        self.by_model: dict[str, list[Item]] = {m: [] for m in models}

    @property
    def queued(self) -> int:
        return sum(len(p) for p in self.by_model.values())

    def add(self, req: Request) -> None:
        pend = self.by_model[req.model]
        pend.extend(Item(req, i, len(u)) for i, u in enumerate(req.prepared.units))
        req.queued = req.n_units

    def drop(self, req: Request) -> int:
        """Take every queued unit of ``req`` out; returns how many there were."""
        pend = self.by_model[req.model]
        kept = [it for it in pend if it.req is not req]
        self.by_model[req.model] = kept
        req.queued = 0
        return len(pend) - len(kept)

    def oldest_model(self) -> str | None:
        """The model whose oldest queued unit is the oldest of all (fairness across models)."""
        busy = [m for m, p in self.by_model.items() if p]
        if not busy:
            return None
        return min(busy, key=lambda m: self.by_model[m][0].req.admitted)

    def take(self, model: str, positions: Sequence[int]) -> list[Item]:
        """Remove the units at ``positions`` (queue indices) of ``model``'s queue and return them."""
        pend = self.by_model[model]
        picked = set(positions)
        items = [pend[i] for i in positions]
        end = max(picked) + 1 if picked else 0
        pend[:end] = [it for i, it in enumerate(pend[:end]) if i not in picked]  # the tail stays put
        for it in items:
            it.req.queued -= 1
        return items

    def requests(self) -> Iterator[Request]:
        """Every request with queued units, once each."""
        seen: set[int] = set()
        for pend in list(self.by_model.values()):
            for it in list(pend):
                if id(it.req) not in seen:
                    seen.add(id(it.req))
                    yield it.req

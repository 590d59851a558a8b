"""What the scheduler holds between admission and answer: requests, their queued units, batches,
and the one exit every request takes.

All of it is touched on the event loop thread only; a worker reads the batch it was handed (and
each unit's ``req.done``, a benign race: a stale read only costs one wasted row).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from encapure.engine.types import Prepared, Unit
from encapure.errors import CancelledRequestError, DeadlineExceededError, EncapureError
from encapure.scheduler.admission import Admission, Ticket, unit_work
from encapure.scheduler.metrics import SchedulerMetrics

log = logging.getLogger("encapure.scheduler")


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
    ticket: Ticket | None = None  # its admission room
    queue: list[Item] = field(default_factory=list)  # its queued units, in unit order
    queued_work: float = 0.0  # the work of those units
    work: float = 0.0  # the work of all its units
    heavy: bool = False  # more than a few full batches of work (see policy.is_heavy)


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
    heavy: bool = False  # holds units of a heavy request (policy.is_heavy)

    def requests(self) -> list[Request]:
        """The distinct requests with units in this batch."""
        return list({id(it.req): it.req for it in self.items}.values())


class PendingUnits:
    """Per model, the requests with queued units (admission order), each holding its own units."""

    def __init__(self, models: Sequence[str]) -> None:
        self.by_model: dict[str, list[Request]] = {m: [] for m in models}
        self._count: dict[str, int] = dict.fromkeys(models, 0)

    @property
    def queued(self) -> int:
        return sum(self._count.values())

    def depth(self, model: str) -> int:
        """Queued units of ``model``."""
        return self._count[model]

    def add(self, req: Request) -> None:
        req.queue = [Item(req, i, len(u)) for i, u in enumerate(req.prepared.units)]
        req.queued = len(req.queue)
        req.queued_work = req.work = sum(unit_work(it.length) for it in req.queue)
        if req.queue:
            self.by_model[req.model].append(req)
            self._count[req.model] += req.queued

    def drop(self, req: Request) -> int:
        """Take every queued unit of ``req`` out; returns how many there were."""
        n = len(req.queue)
        if n:
            self._count[req.model] -= n
            self.by_model[req.model].remove(req)
        req.queue = []
        req.queued = 0
        req.queued_work = 0.0
        return n

    def oldest_model(self) -> str | None:
        """The model whose oldest queued request is the oldest of all (fairness across models)."""
        busy = [m for m, p in self.by_model.items() if p]
        if not busy:
            return None
        return min(busy, key=lambda m: self.by_model[m][0].admitted)

    def take(self, model: str, items: Sequence[Item]) -> list[Item]:
        """Remove ``items`` (queued units of ``model``) from their requests' queues and return them."""
        picked = {id(it) for it in items}
        touched = {id(it.req): it.req for it in items}
        for req in touched.values():
            kept = [it for it in req.queue if id(it) not in picked]
            for it in req.queue:
                if id(it) in picked:
                    req.queued_work -= unit_work(it.length)
            self._count[model] -= len(req.queue) - len(kept)
            req.queue = kept
            req.queued = len(kept)
            if not kept:
                self.by_model[model].remove(req)
        return list(items)

    def requests(self) -> Iterator[Request]:
        """Every request with queued units, once each."""
        for reqs in list(self.by_model.values()):
            yield from list(reqs)


class InProgress:
    """The admitted requests: registering them, their deadlines and cancellation, and ``finish``,
    the one exit of every request (result, model error, deadline, cancellation, worker death,
    shutdown, internal error), which releases its admission exactly once and answers it unless
    the caller already left."""

    def __init__(
        self, models: Sequence[str], admission: Admission, metrics: SchedulerMetrics, default_timeout_s: float
    ) -> None:
        self.pending = PendingUnits(models)
        self.requests: set[Request] = set()
        self.admission = admission
        self.metrics = metrics
        self.default_timeout_s = default_timeout_s

    def open(
        self,
        loop: asyncio.AbstractEventLoop,
        model: str,
        prepared: Prepared,
        *,
        deadline: float,
        is_cancelled: Callable[[], bool] | None,
        timings: dict[str, float] | None,
        now: float,
        ticket: Ticket | None = None,
    ) -> Request:
        """Register an admitted request, arm its deadline and queue its units."""
        n = len(prepared.units)
        req = Request(
            model=model,
            prepared=prepared,
            future=loop.create_future(),
            deadline=deadline,
            is_cancelled=is_cancelled,
            admitted=now,
            n_units=n,
            remaining=n,
            timings=timings,
            ticket=ticket,
        )
        self.requests.add(req)
        self.metrics.requests_in_scheduler.set(len(self.requests))
        req.timer = loop.call_later(max(0.0, deadline - now), self.expire, req)
        self.pending.add(req)
        self.metrics.queue_depth.labels(model=model).set(self.pending.depth(model))
        return req

    def expire(self, req: Request) -> None:
        req.timer = None
        if not req.done:
            self.finish(
                req,
                error=DeadlineExceededError(
                    f"the request did not finish within its deadline ({self.default_timeout_s:g} s by default)"
                ),
                reason="deadline",
            )

    def finish(
        self,
        req: Request,
        *,
        error: BaseException | None,
        reason: str = "error",
        result: npt.NDArray[np.float32] | None = None,
    ) -> None:
        """The one exit of every request: drop its queued units, release capacity, answer it."""
        if req.done:
            return
        req.done = True
        req.drop_reason = reason
        # answer first: whatever the bookkeeping below does, the caller is never left waiting
        # (the awaiting coroutine resumes only after this callback returns, timings included)
        fut = req.future
        if not fut.done():
            if error is not None:
                fut.set_exception(error)
            elif result is not None:
                fut.set_result(result)
            else:
                fut.cancel()
        if req.timer is not None:
            req.timer.cancel()
            req.timer = None
        if req.queued:
            dropped = self.pending.drop(req)
            self.metrics.queue_depth.labels(model=req.model).set(self.pending.depth(req.model))
            if dropped and result is None:
                self.metrics.dropped_items.labels(reason=reason).inc(dropped)
        self.requests.discard(req)
        self.metrics.requests_in_scheduler.set(len(self.requests))
        if req.ticket is not None:
            self.admission.release(req.ticket)
        if result is not None:
            queue_s = max(0.0, req.last_start - req.admitted)
            if req.timings is not None:
                req.timings["queue_s"] = queue_s
                req.timings["inference_s"] = max(0.0, time.monotonic() - req.first_start)
                req.timings["forward_s"] = req.forward_s
                req.timings["batches"] = float(req.batches)
            self.metrics.queue_seconds.labels(model=req.model).observe(queue_s)

    def fail_all(self, error_factory: Callable[[], EncapureError], reason: str) -> None:
        for req in list(self.requests):
            self.finish(req, error=error_factory(), reason=reason)

    def still_wanted(self, req: Request, now: float) -> bool:
        """False (and the request ended) when it is done, expired or its client went away."""
        if req.done:
            return False
        if now >= req.deadline:
            self.expire(req)
            return False
        if req.is_cancelled is not None:
            try:
                gone = bool(req.is_cancelled())
            except Exception:
                log.exception("is_cancelled callback raised; treating the request as cancelled")
                gone = True
            if gone:
                self.finish(req, error=CancelledRequestError("the client went away"), reason="cancelled")
                return False
        return True

    def live_items(self, items: list[Item], now: float) -> list[Item]:
        """Drop units whose request ended, expired or was abandoned by its client."""
        checked: dict[int, bool] = {}
        live = []
        for it in items:
            req = it.req
            ok = checked.get(id(req))
            if ok is None:
                ok = checked[id(req)] = self.still_wanted(req, now)
            if ok:
                live.append(it)
            else:
                self.metrics.dropped_items.labels(reason=req.drop_reason).inc()
        return live

    def sweep(self, now: float) -> None:
        """Ask every queued request whether it is still wanted."""
        for req in self.pending.requests():
            self.still_wanted(req, now)

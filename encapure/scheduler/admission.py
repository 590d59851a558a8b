"""Bounded admission: how many requests and units may be in the system, and Retry-After.

Why it is its own part: capacity is what turns overload into a quick ``OverloadedError`` with an
honest ``retry_after`` instead of an ever-growing queue. Capacity is taken when it is granted
(``items`` and ``reserved``), before the request registers, so two waiters can never be granted
the same room. Lives on the event loop thread; no locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable

from encapure.errors import DeadlineExceededError, EncapureError, OverloadedError
from encapure.scheduler.metrics import SchedulerMetrics

_Waiter = tuple[int, "asyncio.Future[bool]"]


class Admission:
    """``max_concurrent_requests`` requests and ``max_queued_items`` units (queued or running)."""

    def __init__(
        self,
        max_requests: int,
        max_items: int,
        timeout_s: float,
        metrics: SchedulerMetrics,
    ) -> None:
        self.max_requests = max_requests
        self.max_items = max_items
        self.timeout_s = timeout_s
        self.metrics = metrics
        self.active = 0  # registered requests not yet released
        self.reserved = 0  # room granted to requests that have not registered yet
        self.items = 0  # units of granted requests, queued or running
        self.waiters: list[_Waiter] = []
        self.rate = 0.0  # EWMA of computed units per second, for Retry-After

    def fits(self, n: int) -> bool:
        if self.active + self.reserved >= self.max_requests:
            return False
        # a request larger than the whole queue still runs, alone, rather than never
        return self.items + n <= self.max_items or self.items == 0

    def _grant(self, n: int) -> None:
        self.items += n
        self.reserved += 1

    async def admit(self, n: int, deadline: float) -> None:
        """Reserve room for ``n`` units, waiting at most the admission timeout (and the deadline)."""
        if not self.waiters and self.fits(n):
            self._grant(n)
            return
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        entry = (n, waiter)
        self.waiters.append(entry)
        limit = min(self.timeout_s, max(0.0, deadline - time.monotonic()))
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout=limit)
        except asyncio.TimeoutError:
            pass
        except asyncio.CancelledError:
            self._abandon(entry)
            raise
        if waiter.done() and not waiter.cancelled():
            exc = waiter.exception()
            if exc is None:
                return  # granted: room already reserved for us
            raise exc
        self._abandon(entry)
        if time.monotonic() >= deadline:
            self.metrics.dropped_items.labels(reason="deadline").inc(n)
            raise DeadlineExceededError("the request deadline passed while waiting for capacity")
        self.metrics.rejected_requests.labels(reason="overloaded").inc()
        raise OverloadedError(
            f"the server is at capacity ({self.active} requests, {self.items} items "
            "in progress); retry later",
            retry_after=self.retry_after(),
        )

    def claim(self) -> None:
        """The granted request registers: its reservation becomes an active request."""
        self.reserved -= 1
        self.active += 1

    def release(self, n: int) -> None:
        """A claimed request of ``n`` units ended: its room goes to the waiters."""
        self.active -= 1
        self.items -= n
        self._wake()

    def _abandon(self, entry: _Waiter) -> None:
        n, waiter = entry
        with contextlib.suppress(ValueError):
            self.waiters.remove(entry)
        if waiter.done():
            if not waiter.cancelled() and waiter.exception() is None:
                # room was granted in the same instant we gave up: hand it back
                self.reserved -= 1
                self.items -= n
                self._wake()
        else:
            waiter.cancel()

    def _wake(self) -> None:
        """Grant room to waiters in arrival order (first fit: a big one does not block small ones)."""
        if not self.waiters:
            return
        still: list[_Waiter] = []
        for entry in self.waiters:
            n, w = entry
            if w.done():
                continue
            if self.fits(n):
                self._grant(n)
                w.set_result(True)
            else:
                still.append(entry)
        self.waiters = still

    def fail_waiters(self, error_factory: Callable[[], EncapureError]) -> None:
        for _, w in self.waiters:
            if not w.done():
                w.set_exception(error_factory())
        self.waiters.clear()

    def observe(self, units: int, elapsed: float, workers: int) -> None:
        """Units per second the workers sustain while busy (idle gaps must not lower it)."""
        inst = units / max(elapsed, 1e-4) * max(1, workers)
        self.rate = inst if self.rate == 0 else 0.8 * self.rate + 0.2 * inst

    def retry_after(self) -> float:
        """Seconds until the work in progress is likely done, from the recent unit throughput."""
        est = self.items / self.rate if self.rate > 0 else 1.0
        return float(min(60, max(1, math.ceil(est))))

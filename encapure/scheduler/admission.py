"""Work-based admission: what may enter the system, measured in seconds of work, and Retry-After.

Why it is its own part: capacity is what turns overload into a quick ``OverloadedError`` with an
honest ``retry_after`` instead of a queue whose requests then die on their deadlines. Counting
requests or units does not do that: one unit may be 8 tokens or 512, and what matters is whether
the work already in the system plus this request's can be computed before the request's deadline.
So capacity is *work* (tokens plus a per-unit overhead, ``unit_work``) set against the measured
throughput (an EWMA of work per second the workers sustain while busy). The scheduler serves the
least remaining work first (``policy.fair_order``), so what a new request waits for is not the
whole backlog but, of each admitted request, at most as much as its own work (the
processor-sharing bound, above what least-work-first gives). A request is admitted when

- that work ahead of it plus its own drains within ``deadline_share`` of its time left, and
- the whole backlog, its own included, drains within ``backlog_share`` of the request timeout
  (so the requests it overtakes still finish in time).

(``Settings.admission_deadline_share`` and ``admission_backlog_share``; defaults 0.5 and 0.33.)

Before the throughput is measured (the first ``observe_busy`` sample: a stretch of busy time), the
rate is a guess: ``COLD_RATE``, or one batch's rate times the workers, which overstates a shared
CPU (the start-up warm-up request, 4 short units, said 17,000 work/s for a reranker that sustained
4,000-9,000 under load). Admitting 10 s of a guessed rate at once is irreversible: what the real
rate cannot finish expires (a storm on a freshly started server got 125 ``deadline_exceeded``).
So until then admission counts with a quarter of the guess (``COLD_MARGIN``), but always lets in
``cold_work`` (the scheduler passes one full batch per worker: what the workers start at once),
and the first busy sample replaces the guess instead of blending with it (lowering it by at most
4x: one stalled sample is not the rate). Refusing too much for the first half second of busy time
costs a few fast 503s; admitting too much costs requests that wait 30 s and fail.

Capacity is taken when it is granted (a ``Ticket``), before the request registers, so two waiters
can never be granted the same room. A request that plainly cannot fit within the admission timeout
is refused at once (no pointless wait). Lives on the event loop thread; no locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from encapure.errors import DeadlineExceededError, EncapureError, OverloadedError
from encapure.scheduler.metrics import SchedulerMetrics
from encapure.settings import Settings

# The defaults of the two shares (Settings fields: their docs say why these values).
ADMIT_FRACTION: float = Settings.model_fields["admission_deadline_share"].default
BACKLOG_FRACTION: float = Settings.model_fields["admission_backlog_share"].default
# The most Retry-After says, in seconds (the keep-alive timeout's default is above it).
RETRY_AFTER_MAX_S = 60
# Per-unit cost beyond its tokens (padding, the per-row head, copying), in tokens.
UNIT_OVERHEAD = 16
# Work per second assumed before the first batch is measured: low on purpose (a 2-core CPU runs a
# MiniLM-L6 reranker at int8 several times faster), so a cold server cannot over-admit by much;
# the first batches replace it.
COLD_RATE = 4000.0
# Until the throughput is measured, admission counts with this fraction of the guessed rate (one
# batch's rate times the workers said 4x the rate a storm then sustained), beyond what the workers
# start at once: the shares' margin (a third of the deadline for the backlog) then still holds.
COLD_MARGIN = 4.0
# Tokenizing is far cheaper than a forward pass: what a token of a /tokenize or /decode request
# weighs against the model's throughput.
TOKENIZER_WEIGHT = 0.02


def unit_work(tokens: int, units: int = 1) -> float:
    """The work of ``units`` units holding ``tokens`` tokens in all."""
    return float(tokens + UNIT_OVERHEAD * units)


# The least work any admitted request brings (one unit, whatever its tokens, or a tokenizer-only
# request): what a request weighs before its body is read.
MIN_REQUEST_WORK = unit_work(0, 1)


@dataclass(eq=False)
class Ticket:
    """Room granted to one request: its units and the work not yet computed."""

    units: int
    work: float
    released: bool = False


_Waiter = tuple[Ticket, float, "asyncio.Future[bool]"]


class Admission:
    """``max_concurrent_requests`` requests, ``max_queued_items`` units, and the work the measured
    throughput finishes within each request's deadline."""

    def __init__(
        self,
        max_requests: int,
        max_items: int,
        timeout_s: float,
        metrics: SchedulerMetrics,
        backlog_s: float = 30.0,
        *,
        deadline_share: float = ADMIT_FRACTION,
        backlog_share: float = BACKLOG_FRACTION,
        cold_work: float = math.inf,
    ) -> None:
        self.max_requests = max_requests
        self.cold_work = cold_work  # admitted before the rate is measured, whatever the guess says
        self.deadline_share = deadline_share
        self.backlog_share = backlog_share
        self.backlog_s = backlog_s
        self.max_items = max_items
        self.timeout_s = timeout_s
        self.metrics = metrics
        self.active = 0  # registered requests not yet released
        self.reserved = 0  # room granted to requests that have not registered yet
        self.items = 0  # units of granted requests, queued or running
        self.work = 0.0  # work of granted requests not computed yet
        self.waiters: list[_Waiter] = []
        self.tickets: set[Ticket] = set()  # granted, not released
        self._busy_samples = 0
        self.rate = 0.0  # EWMA of work per second the workers sustain (0: not measured yet)

    def forget(self) -> None:
        """Back to the cold regime (no rate): what ran so far paid one-time costs (the server's
        warm-up: OpenVINO repacks an IR's weights at the first inference, ONNX Runtime grows its
        arena), and a rate taken from it made a bge-reranker-v2-m3 int4 IR server refuse every
        8 x 64 request as too large, for good, since nothing admitted meant nothing re-measured."""
        self.rate = 0.0
        self._busy_samples = 0

    @property
    def measured(self) -> bool:
        """Whether the rate comes from a stretch of busy time (not a guess)."""
        return self._busy_samples > 0

    @property
    def throughput(self) -> float:
        return self.rate if self.rate > 0 else COLD_RATE

    def max_single_work(self) -> float:
        """The most work one request may bring: half the backlog budget, so small requests still
        fit beside the largest one allowed."""
        return self.throughput * self.backlog_share / 2 * self.backlog_s

    def drain_s(self, extra: float = 0.0) -> float:
        """Seconds until the work in the system (plus ``extra``) is computed, at the measured rate."""
        return (self.work + extra) / self.throughput

    def ahead_of(self, work: float) -> float:
        """Admitted work a request of ``work`` waits for under least-work-first (an upper bound)."""
        return sum(min(o.work, work) for o in self.tickets)

    def _work_fits(
        self, t: Ticket, deadline: float, now: float, drained: float = 0.0, *, cold_cap: bool = True
    ) -> bool:
        """Whether ``t`` fits by work at ``now``, once ``drained`` work has been computed (negative:
        work that will be granted before it)."""
        ahead = max(0.0, self.ahead_of(t.work) - drained)
        backlog = max(0.0, self.work - drained)

        def by_rate(rate: float) -> bool:
            return (ahead + t.work) / rate <= self.deadline_share * max(0.0, deadline - now) and (
                backlog + t.work
            ) / rate <= self.backlog_share * self.backlog_s

        if not by_rate(self.throughput):
            return False
        if not cold_cap or self.measured:
            return True
        # The rate is a guess: admit by a quarter of it, or (whatever the guess) what the request
        # waits for under least work first plus its own within what the workers start at once (a
        # heavy request running alone counts for at most a small one's own work).
        return ahead + t.work <= self.cold_work or by_rate(self.throughput / COLD_MARGIN)

    def fits(self, t: Ticket, deadline: float, now: float) -> bool:
        if self.active + self.reserved >= self.max_requests:
            return False
        if self.items == 0 and self.work <= 0:
            return True  # a request bigger than the whole budget still runs, alone, rather than never
        if self.items + t.units > self.max_items:
            return False
        return self._work_fits(t, deadline, now)

    def _hopeless(self, t: Ticket, deadline: float, now: float) -> bool:
        """Whether waiting the admission timeout cannot make room by work (the queue drains at
        ``throughput`` meanwhile), so the request is refused at once."""
        if self.items == 0:
            return False
        wait = min(self.timeout_s, max(0.0, deadline - now))
        # the requests already waiting are granted first (first fit): their work counts too
        waiting = sum(w[0].work for w in self.waiters)
        # not the cold cap: the batches running now free it within the wait, whatever the rate
        return not self._work_fits(t, deadline, now + wait, drained=self.throughput * wait - waiting, cold_cap=False)

    def refuses_now(self, work: float, deadline: float) -> bool:
        """Whether any request of at least ``work`` (one unit or more) would be refused at once now:
        it does not fit, and waiting the admission timeout could not make room. Reserves nothing.
        True for ``work`` means true for anything larger (both tests grow with the work), so the
        HTTP layer can ask with the least work a request brings and refuse before reading a body."""
        t = Ticket(1, work)
        now = time.monotonic()
        if now >= deadline or (not self.waiters and self.fits(t, deadline, now)):
            return False
        return self._hopeless(t, deadline, now)

    def _grant(self, t: Ticket) -> None:
        self.tickets.add(t)
        self.items += t.units
        self.work += t.work
        self.reserved += 1

    async def admit(self, units: int, work: float, deadline: float) -> Ticket:
        """Reserve room for ``units`` units of ``work``, waiting at most the admission timeout (and
        the deadline); refuses at once when the wait could not make room."""
        t = Ticket(units, work)
        now = time.monotonic()
        if not self.waiters and self.fits(t, deadline, now):
            self._grant(t)
            return t
        if now >= deadline:
            self.metrics.dropped_items.labels(reason="deadline").inc(units)
            raise DeadlineExceededError("the request deadline passed before it could be admitted")
        if not self._hopeless(t, deadline, now):
            waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            entry = (t, deadline, waiter)
            self.waiters.append(entry)
            limit = min(self.timeout_s, max(0.0, deadline - now))
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
                    return t  # granted: room already reserved for us
                raise exc
            self._abandon(entry)
            if time.monotonic() >= deadline:
                self.metrics.dropped_items.labels(reason="deadline").inc(units)
                raise DeadlineExceededError("the request deadline passed while waiting for capacity")
        self.metrics.rejected_requests.labels(reason="overloaded").inc()
        raise OverloadedError(
            f"the server is at capacity ({self.active + self.reserved} requests, {self.items} units, "
            f"about {self.drain_s():.1f} s of work in progress); retry later",
            retry_after=self.retry_after(),
        )

    def claim(self) -> None:
        """The granted request registers: its reservation becomes an active request."""
        self.reserved -= 1
        self.active += 1

    def resize(self, t: Ticket, units: int, work: float) -> None:
        """The request's real size is known (it was tokenized): the estimate gives way to it."""
        self.items += units - t.units
        self.work += work - t.work
        t.units, t.work = units, work
        self._wake()

    def computed(self, t: Ticket, work: float) -> None:
        """Part of a request's work was computed: it no longer weighs on the queue."""
        done = min(work, t.work)
        t.work -= done
        self.work -= done

    def release(self, t: Ticket, *, claimed: bool = True) -> None:
        """A request ended: its room goes to the waiters (once, whatever calls this)."""
        if t.released:
            return
        t.released = True
        self.tickets.discard(t)
        if claimed:
            self.active -= 1
        else:
            self.reserved -= 1
        self.items -= t.units
        self.work -= t.work
        t.work = 0.0
        if self.items <= 0:
            self.work = 0.0  # float drift must not leave phantom work behind
        self._wake()

    def _abandon(self, entry: _Waiter) -> None:
        t, _, waiter = entry
        with contextlib.suppress(ValueError):
            self.waiters.remove(entry)
        if waiter.done():
            if not waiter.cancelled() and waiter.exception() is None:
                # room was granted in the same instant we gave up: hand it back
                self.release(t, claimed=False)
        else:
            waiter.cancel()

    def _wake(self) -> None:
        """Grant room to waiters in arrival order (first fit: a big one does not block small ones)."""
        if not self.waiters:
            return
        now = time.monotonic()
        still: list[_Waiter] = []
        for entry in self.waiters:
            t, deadline, w = entry
            if w.done():
                continue
            if self.fits(t, deadline, now):
                self._grant(t)
                w.set_result(True)
            else:
                still.append(entry)
        self.waiters = still

    def poke(self) -> None:
        """Work was computed: room may have freed for a waiter."""
        self._wake()

    def fail_waiters(self, error_factory: Callable[[], EncapureError]) -> None:
        for _, _, w in self.waiters:
            if not w.done():
                w.set_exception(error_factory())
        self.waiters.clear()

    def observe(self, work: float, elapsed: float, workers: int) -> None:
        """One batch's work per second times the live workers: a first guess, until ``observe_busy``
        has measured a stretch of busy time (per-batch rates overstate a CPU shared with the other
        workers and other processes)."""
        if self._busy_samples:
            return
        inst = work / max(elapsed, 1e-4) * max(1, workers)
        self.rate = inst if self.rate == 0 else 0.8 * self.rate + 0.2 * self._clip(inst)

    def observe_busy(self, work: float, busy_s: float) -> None:
        """Work completed over wall-clock time while at least one batch ran: what the workers
        together really sustain (idle gaps excluded). The first one replaces the guess (blended
        with a guess 4x too high it would still say 3x, and admit by it), lowering it by at most
        4x: a first sample that caught a stall (one slow batch, a pause) would otherwise make every
        later request look too large to admit (413) until the estimate recovered."""
        inst = work / max(busy_s, 1e-4)
        if not self.measured:
            self.rate = inst if self.rate == 0 else max(inst, self.rate / 4)
        else:
            self.rate = 0.7 * self.rate + 0.3 * self._clip(inst)
        self._busy_samples += 1

    def _clip(self, inst: float) -> float:
        """One sample moves the estimate by at most 2x (a stalled batch or a pause is an outlier;
        a lasting change still shows within a few samples)."""
        return min(max(inst, self.rate / 2), self.rate * 2)

    def retry_after(self) -> float:
        """Seconds until the work in progress is computed at the measured throughput (1 to
        ``RETRY_AFTER_MAX_S``)."""
        return float(min(RETRY_AFTER_MAX_S, max(1, math.ceil(self.drain_s()))))

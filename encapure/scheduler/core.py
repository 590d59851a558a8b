"""Cross-request dynamic batching on top of the engine's ``InferenceModel`` contract.

Why this exists: one request rarely fills a batch, and running each request alone wastes the
throughput that padding-aware batching gives. The scheduler pools the *units* (tokenized
sequences) of every concurrent request, cuts them into length-sorted batches under the engine's
token budget, runs those batches on worker threads and routes each row back to its request.

Design, in one place:

- All bookkeeping (queues, requests, admission, counters) lives on the event loop thread and is
  mutated only there, so it needs no locks. Worker threads touch nothing but the batch they were
  handed; they report back with ``loop.call_soon_threadsafe``.
- There is no batcher task that could die silently: ``_pump`` is a plain function called whenever
  something changes (a request arrives, a batch finishes, a request gives up, a timer fires).
  A failure inside it fails the queued requests instead of leaving them pending.
- A batch is handed over only when a worker is idle, so while workers are busy the queue grows and
  the next batch is fuller (continuous batching). A partial batch waits at most ``max_wait_ms``
  for company, and not at all when nothing else is being tokenized: a lone request is never
  delayed by the window.
- Every request has a deadline timer; every path that ends a request (result, model error,
  deadline, cancellation, worker death, shutdown, internal error) goes through ``_finish``, which
  releases its admission slot exactly once and answers its future unless the caller already left.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import math
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from encapure.engine.types import InferenceModel, Prepared
from encapure.errors import (
    CancelledRequestError,
    DeadlineExceededError,
    EncapureError,
    InvalidInputError,
    ModelError,
    ModelNotFoundError,
    NotReadyError,
    OverloadedError,
    ShuttingDownError,
    WorkerDiedError,
)
from encapure.scheduler.metrics import SchedulerMetrics
from encapure.settings import Settings

_engine_plan_batches: Callable[..., list[list[int]]] | None
try:  # the engine's planner is the reference; keep a private copy until it lands
    from encapure.engine.batching import plan_batches as _engine_plan_batches
except ImportError:  # pragma: no cover - only before the engine module exists
    _engine_plan_batches = None

log = logging.getLogger("encapure.scheduler")

T = TypeVar("T")

# How often queued requests are asked whether their client is still there.
_CANCEL_SWEEP_S = 0.05
# How many queued units (oldest first) one batch decision looks at: enough to sort by length.
_WINDOW_BATCHES = 4
# A last partial batch is shared among idle workers only if each part keeps at least this many units.
_MIN_SPLIT_UNITS = 4


def _plan_batches(lengths: list[int], max_batch_tokens: int, max_batch_size: int) -> list[list[int]]:
    if _engine_plan_batches is not None:
        return _engine_plan_batches(lengths, max_batch_tokens, max_batch_size)
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    batches: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for i in order:
        n = lengths[i]
        if cur and (len(cur) + 1 > max_batch_size or (len(cur) + 1) * max(longest, n) > max_batch_tokens):
            batches.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    if cur:
        batches.append(cur)
    return batches


class _WorkerKilled(BaseException):
    """Simulated crash (fault injection): escapes every ``except Exception`` like a real one would."""


@dataclass(eq=False)
class _Request:
    model: str
    prepared: Prepared
    future: asyncio.Future[npt.NDArray[np.float32]]
    deadline: float
    is_cancelled: Callable[[], bool] | None
    admitted: float
    n_units: int
    remaining: int
    fault: str | None = None
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
class _Item:
    req: _Request
    index: int
    length: int


@dataclass(eq=False)
class _Batch:
    model: str
    items: list[_Item]
    ran: list[_Item] = field(default_factory=list)
    started: float = 0.0
    elapsed: float = 0.0


class Scheduler:
    """Queues the units of concurrent requests and runs them in shared batches on worker threads.

    One scheduler serves several models (batches never mix models); ``Settings.workers`` threads
    take batches of any model. Use from one event loop: ``await start()``, then ``prepare`` /
    ``submit`` from request handlers, ``await shutdown(timeout)`` at the end.
    """

    def __init__(
        self,
        models: Mapping[str, InferenceModel],
        settings: Settings,
        metrics: SchedulerMetrics | None = None,
    ) -> None:
        for knob in (
            "workers",
            "max_batch_size",
            "max_batch_tokens",
            "max_concurrent_requests",
            "max_queued_items",
        ):
            if getattr(settings, knob) < 1:
                raise InvalidInputError(f"{knob} must be at least 1, got {getattr(settings, knob)}")
        for knob in ("max_wait_ms", "admission_timeout_s", "request_timeout_s"):
            if getattr(settings, knob) < 0:
                raise InvalidInputError(f"{knob} must not be negative, got {getattr(settings, knob)}")
        self.models: dict[str, InferenceModel] = dict(models)
        self.settings = settings
        self.metrics = metrics if metrics is not None else SchedulerMetrics()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._jobs: queue.SimpleQueue[_Batch | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._alive = 0
        self._idle = 0
        self._prep_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._started = False
        self._accepting = False
        self._stopped = False
        # queue: per model, oldest first
        self._pending: dict[str, list[_Item]] = {name: [] for name in self.models}
        self._queued_items = 0
        # admission
        self._requests: set[_Request] = set()
        self._items_in_system = 0
        self._waiters: list[tuple[int, asyncio.Future[bool]]] = []
        self._reserved = 0  # room granted to requests that have not registered yet
        # Prepared objects whose tokenization began before shutdown: still admitted while draining
        # (keyed by id: Prepared is an unhashable dataclass; an entry dies with its object)
        self._grace: weakref.WeakValueDictionary[int, Prepared] = weakref.WeakValueDictionary()
        # When nothing else is coming, cut the last batch into parts for the idle workers.
        self.split_idle = True
        # pacing
        self._preparing = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._last_sweep = 0.0
        self._inflight = 0
        # counters for stats()
        self._n_batches = 0
        self._n_units = 0
        self._n_cross_batches = 0
        self._rate = 0.0  # EWMA of computed units per second, for Retry-After
        self.metrics.workers_alive.set(0)
        for name in self.models:
            self.metrics.queue_depth.labels(model=name).set(0)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Start the inference worker threads; binds the scheduler to the running event loop."""
        if self._started:
            return
        self._loop = asyncio.get_running_loop()
        n_prep = max(2, min(4, os.cpu_count() or 2))
        self._prep_pool = concurrent.futures.ThreadPoolExecutor(n_prep, thread_name_prefix="encapure-prepare")
        for wid in range(self.settings.workers):
            t = threading.Thread(
                target=self._worker_main, args=(wid,), name=f"encapure-worker-{wid}", daemon=True
            )
            self._threads.append(t)
        self._alive = self._idle = len(self._threads)
        self.metrics.workers_alive.set(self._alive)
        for t in self._threads:
            t.start()
        self._started = True
        self._accepting = True

    async def shutdown(self, timeout: float) -> None:
        """Stop admitting, let work already in progress finish for up to ``timeout`` s, fail the rest.

        Draining: ``is_accepting()`` turns False and new ``prepare``/``submit`` calls get
        ``ShuttingDownError`` at once, but everything already in progress is carried to the end:
        admitted requests, requests waiting for admission (within their admission timeout), and
        requests whose ``prepare`` began before the shutdown (their ``submit`` is still admitted).
        At the timeout whatever is left gets ``ShuttingDownError``; then the workers stop.
        """
        if not self._started or self._stopped:
            self._accepting = False
            return
        self._accepting = False
        end = time.monotonic() + max(0.0, timeout)
        while time.monotonic() < end and (
            self._requests or self._waiters or self._reserved or self._preparing or len(self._grace)
        ):
            await asyncio.sleep(0.005)
        self._fail_waiters(lambda: ShuttingDownError("the server is shutting down", retry_after=None))
        for req in list(self._requests):
            self._finish(
                req,
                error=ShuttingDownError(
                    "the server shut down before this request finished", retry_after=None
                ),
                reason="shutdown",
            )
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for _ in self._threads:
            self._jobs.put(None)
        for t in self._threads:
            left = end - time.monotonic()
            # a worker stuck inside a forward pass cannot be interrupted; it is a daemon thread
            await asyncio.to_thread(t.join, max(0.05, left))
        if self._prep_pool is not None:
            self._prep_pool.shutdown(wait=False, cancel_futures=True)

    def bound_to_running_loop(self) -> bool:
        """Whether the scheduler was started in the event loop that is running now."""
        try:
            return self._loop is asyncio.get_running_loop()
        except RuntimeError:
            return False

    def abandon(self) -> None:
        """Stop the workers without a drain, from any thread; for a scheduler whose loop is gone."""
        self._accepting = False
        self._stopped = True
        for _ in self._threads:
            self._jobs.put(None)
        if self._prep_pool is not None:
            self._prep_pool.shutdown(wait=False, cancel_futures=True)

    def _check_loop(self) -> None:
        if not self.bound_to_running_loop():
            raise RuntimeError(
                "this Scheduler was started in another event loop; create and start one per loop"
            )

    def is_healthy(self) -> bool:
        """Liveness: started, not stopped, and every inference worker thread alive."""
        return (
            self._started
            and not self._stopped
            and self._alive == len(self._threads)
            and all(t.is_alive() for t in self._threads)
        )

    def is_accepting(self) -> bool:
        """Whether new work is admitted (started, not draining, at least one worker alive)."""
        return self._started and self._accepting and self._alive > 0

    def stats(self) -> dict[str, Any]:
        """A snapshot for ``/info``, logs and tests."""
        return {
            "started": self._started,
            "accepting": self.is_accepting(),
            "healthy": self.is_healthy(),
            "workers": len(self._threads),
            "workers_alive": self._alive,
            "workers_idle": self._idle,
            "inflight_batches": self._inflight,
            "active_requests": len(self._requests),
            "waiting_admission": len(self._waiters),
            "items_in_system": self._items_in_system,
            "queued_items": self._queued_items,
            "queued_by_model": {m: len(p) for m, p in self._pending.items()},
            "preparing": self._preparing,
            "batches": self._n_batches,
            "units_computed": self._n_units,
            "cross_request_batches": self._n_cross_batches,
            "units_per_second": round(self._rate, 1),
            "limits": {
                "max_batch_tokens": self.settings.max_batch_tokens,
                "max_batch_size": self.settings.max_batch_size,
                "max_wait_ms": self.settings.max_wait_ms,
                "max_concurrent_requests": self.settings.max_concurrent_requests,
                "max_queued_items": self.settings.max_queued_items,
                "admission_timeout_s": self.settings.admission_timeout_s,
                "request_timeout_s": self.settings.request_timeout_s,
            },
        }

    # ------------------------------------------------------------------ public API
    async def prepare(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` (tokenization) on a small thread pool, off the event loop.

        While a call is running the batcher knows more work is on its way, so a partial batch
        waits up to ``max_wait_ms`` for it; with nothing in preparation it goes out at once.
        """
        if not self._started:
            raise NotReadyError("the scheduler is not started")
        self._check_loop()
        if not self._accepting:
            raise ShuttingDownError("the server is shutting down", retry_after=None)
        assert self._loop is not None and self._prep_pool is not None
        self._preparing += 1
        try:
            result = await self._loop.run_in_executor(self._prep_pool, functools.partial(fn, *args, **kwargs))
        finally:
            self._preparing -= 1
        if not self._accepting and not self._stopped:
            # began before the shutdown: this request is already in progress, let it finish
            with contextlib.suppress(TypeError):  # not weak-referenceable: no grace
                self._grace[id(result)] = result  # type: ignore[assignment]
        return result

    async def submit(
        self,
        model: str,
        prepared: Prepared,
        *,
        deadline: float | None = None,
        is_cancelled: Callable[[], bool] | None = None,
        timings: dict[str, float] | None = None,
    ) -> npt.NDArray[np.float32]:
        """Queue a prepared request, wait for its batches, return its raw rows in unit order.

        ``deadline`` is absolute ``time.monotonic()`` seconds (default: now + request_timeout_s);
        ``is_cancelled`` is polled while the units wait (a client that went away); cancelling the
        awaiting task has the same effect. ``timings``, when given, is filled with
        ``admission_s``, ``queue_s`` (admission -> last unit started), ``inference_s`` (first unit
        started -> done) and ``batches``.

        Raises ``ModelNotFoundError``, ``OverloadedError`` (no capacity within
        admission_timeout_s; ``retry_after`` set), ``DeadlineExceededError``,
        ``ShuttingDownError``, ``ModelError`` (its batch failed), ``WorkerDiedError``,
        ``CancelledRequestError`` (``is_cancelled`` turned true), ``NotReadyError`` (not started).
        """
        t0 = time.monotonic()
        if not self._started:
            raise NotReadyError("the scheduler is not started")
        self._check_loop()
        if self._stopped or not (self._accepting or self._take_grace(prepared)):
            self.metrics.rejected_requests.labels(reason="shutting_down").inc()
            raise ShuttingDownError("the server is shutting down", retry_after=None)
        if model not in self.models:
            known = ", ".join(sorted(self.models)) or "none"
            raise ModelNotFoundError(f"model {model!r} is not served here (served: {known})")
        if self._alive == 0:
            self.metrics.rejected_requests.labels(reason="worker_died").inc()
            raise WorkerDiedError("every inference worker has died; the server must be restarted")
        n = len(prepared.units)
        if deadline is None:
            deadline = t0 + self.settings.request_timeout_s
        if n == 0:
            return np.empty((0, 0), dtype=np.float32)
        if deadline <= t0:
            self.metrics.dropped_items.labels(reason="deadline").inc(n)
            raise DeadlineExceededError("the request deadline passed before it could be queued")

        await self._admit(n, deadline)
        loop = self._loop
        assert loop is not None
        now = time.monotonic()
        if timings is not None:
            timings["admission_s"] = now - t0
        fault = None
        if self.settings.fault_injection:
            f = prepared.options.get("fault")
            fault = str(f) if f else None
        req = _Request(
            model=model,
            prepared=prepared,
            future=loop.create_future(),
            deadline=deadline,
            is_cancelled=is_cancelled,
            admitted=now,
            n_units=n,
            remaining=n,
            fault=fault,
            timings=timings,
        )
        self._reserved -= 1
        if self._stopped or self._alive == 0:  # changed while we waited for admission
            self._release(req)
            if self._alive == 0:
                raise WorkerDiedError("every inference worker has died; the server must be restarted")
            raise ShuttingDownError("the server is shutting down", retry_after=None)
        self._requests.add(req)
        self.metrics.requests_in_scheduler.set(len(self._requests))
        req.timer = loop.call_later(max(0.0, deadline - now), self._expire, req)
        pend = self._pending[model]
        for i, u in enumerate(prepared.units):
            pend.append(_Item(req, i, len(u)))
        req.queued = n
        self._queued_items += n
        self.metrics.queue_depth.labels(model=model).set(len(pend))
        self._pump()
        try:
            return await req.future
        except asyncio.CancelledError:
            # the awaiting task was cancelled (client went away): drop what is not computed yet
            self._finish(req, error=None, reason="cancelled")
            raise

    def _take_grace(self, prepared: Prepared) -> bool:
        if self._grace.get(id(prepared)) is prepared:
            del self._grace[id(prepared)]
            return True
        return False

    # ------------------------------------------------------------------ admission
    # Capacity is taken when it is granted (``_items_in_system`` and ``_reserved``), before the
    # request registers, so that two waiters can never be granted the same room.
    def _fits(self, n: int) -> bool:
        s = self.settings
        if len(self._requests) + self._reserved >= s.max_concurrent_requests:
            return False
        # a request larger than the whole queue still runs, alone, rather than never
        return self._items_in_system + n <= s.max_queued_items or self._items_in_system == 0

    def _grant(self, n: int) -> None:
        self._items_in_system += n
        self._reserved += 1

    async def _admit(self, n: int, deadline: float) -> None:
        """Reserve room for ``n`` units, waiting at most admission_timeout_s (and the deadline)."""
        if not self._waiters and self._fits(n):
            self._grant(n)
            return
        assert self._loop is not None
        waiter: asyncio.Future[bool] = self._loop.create_future()
        entry = (n, waiter)
        self._waiters.append(entry)
        limit = min(self.settings.admission_timeout_s, max(0.0, deadline - time.monotonic()))
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout=limit)
        except asyncio.TimeoutError:
            pass
        except asyncio.CancelledError:
            self._abandon_waiter(entry)
            raise
        if waiter.done() and not waiter.cancelled():
            exc = waiter.exception()
            if exc is None:
                return  # granted: room already reserved for us
            raise exc
        self._abandon_waiter(entry)
        if time.monotonic() >= deadline:
            self.metrics.dropped_items.labels(reason="deadline").inc(n)
            raise DeadlineExceededError("the request deadline passed while waiting for capacity")
        self.metrics.rejected_requests.labels(reason="overloaded").inc()
        raise OverloadedError(
            f"the server is at capacity ({len(self._requests)} requests, {self._items_in_system} items "
            "in progress); retry later",
            retry_after=self._retry_after(),
        )

    def _abandon_waiter(self, entry: tuple[int, asyncio.Future[bool]]) -> None:
        n, waiter = entry
        with contextlib.suppress(ValueError):
            self._waiters.remove(entry)
        if waiter.done():
            if not waiter.cancelled() and waiter.exception() is None:
                # room was granted in the same instant we gave up: hand it back
                self._reserved -= 1
                self._items_in_system -= n
                self._wake_waiters()
        else:
            waiter.cancel()

    def _wake_waiters(self) -> None:
        """Grant room to waiters in arrival order (first fit: a big one does not block small ones)."""
        if not self._waiters:
            return
        still: list[tuple[int, asyncio.Future[bool]]] = []
        for entry in self._waiters:
            n, w = entry
            if w.done():
                continue
            if self._fits(n):
                self._grant(n)
                w.set_result(True)
            else:
                still.append(entry)
        self._waiters = still

    def _fail_waiters(self, error_factory: Callable[[], EncapureError]) -> None:
        for _, w in self._waiters:
            if not w.done():
                w.set_exception(error_factory())
        self._waiters.clear()

    def _retry_after(self) -> float:
        """Seconds until the work in progress is likely done, from the recent unit throughput."""
        est = self._items_in_system / self._rate if self._rate > 0 else 1.0
        return float(min(60, max(1, math.ceil(est))))

    def _release(self, req: _Request) -> None:
        self._items_in_system -= req.n_units
        self._wake_waiters()

    # ------------------------------------------------------------------ ending requests
    def _expire(self, req: _Request) -> None:
        req.timer = None
        if not req.done:
            self._finish(
                req,
                error=DeadlineExceededError(
                    f"the request did not finish within its deadline "
                    f"({self.settings.request_timeout_s:g} s by default)"
                ),
                reason="deadline",
            )

    def _finish(
        self,
        req: _Request,
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
            pend = self._pending[req.model]
            kept = [it for it in pend if it.req is not req]
            dropped = len(pend) - len(kept)
            self._pending[req.model] = kept
            self._queued_items -= dropped
            req.queued = 0
            self.metrics.queue_depth.labels(model=req.model).set(len(kept))
            if dropped and result is None:
                self.metrics.dropped_items.labels(reason=reason).inc(dropped)
        self._requests.discard(req)
        self.metrics.requests_in_scheduler.set(len(self._requests))
        self._release(req)
        if result is not None and req.timings is not None:
            done = time.monotonic()
            req.timings["queue_s"] = max(0.0, req.last_start - req.admitted)
            req.timings["inference_s"] = max(0.0, done - req.first_start)
            req.timings["forward_s"] = req.forward_s
            req.timings["batches"] = float(req.batches)
        if result is not None:
            self.metrics.queue_seconds.labels(model=req.model).observe(
                max(0.0, req.last_start - req.admitted)
            )

    def _fail_all(self, error_factory: Callable[[], EncapureError], reason: str) -> None:
        for req in list(self._requests):
            self._finish(req, error=error_factory(), reason=reason)

    # ------------------------------------------------------------------ batching
    def _pump(self) -> None:
        """Hand batches to idle workers; (re)arm the timer for the next decision."""
        if self._stopped:
            return
        try:
            self._pump_inner()
        except Exception:
            # A bug here may have taken units off the queue without dispatching them; which ones is
            # unknowable, so every request in progress is failed rather than any left pending.
            log.exception("scheduler error; failing every request in progress")
            self._fail_all(lambda: ModelError("internal scheduler error"), "error")

    def _pump_inner(self) -> None:
        now = time.monotonic()
        if self._queued_items and now - self._last_sweep >= _CANCEL_SWEEP_S:
            self._sweep(now)
        s = self.settings
        max_wait = s.max_wait_ms / 1000.0
        wake_at = math.inf
        while self._idle > 0 and self._queued_items > 0:
            model = min(
                (m for m, p in self._pending.items() if p),
                key=lambda m: self._pending[m][0].req.admitted,
            )
            pend = self._pending[model]
            window = pend[: s.max_batch_size * _WINDOW_BATCHES]
            lens = [it.length for it in window]
            if len(lens) <= s.max_batch_size and len(lens) * max(lens) <= s.max_batch_tokens:
                plan = [list(range(len(lens)))]  # it all fits one batch: nothing to plan
            else:
                plan = _plan_batches(lens, s.max_batch_tokens, s.max_batch_size)
            oldest_age = now - window[0].req.admitted
            full = len(plan) > 1 or len(window) < len(pend)
            if not full and oldest_age < max_wait and self._preparing > 0:
                wake_at = min(wake_at, window[0].req.admitted + max_wait)
                break
            if oldest_age >= max_wait or not full:
                chosen = next(b for b in plan if 0 in b)
            else:
                chosen = max(plan, key=len)
            parts = 1
            if not full and self._preparing == 0 and self.split_idle:
                # nothing else is coming and several workers idle: share the work for latency
                parts = max(1, min(self._idle, len(chosen) // _MIN_SPLIT_UNITS))
            if parts > 1:
                # longest units first; cut where this part holds about 1/parts of the tokens
                part_lens = sorted((window[i].length for i in chosen), reverse=True)
                chosen = sorted(chosen, key=lambda i: -window[i].length)
                target = sum(part_lens) / parts
                acc, k = 0, 0
                while k < len(part_lens) - 1 and acc + part_lens[k] <= target:
                    acc += part_lens[k]
                    k += 1
                chosen = chosen[: max(1, k)]
            picked = set(chosen)
            items = [window[i] for i in chosen]
            rest = [it for i, it in enumerate(window) if i not in picked]
            if len(window) < len(pend):
                rest.extend(pend[len(window) :])
            self._pending[model] = rest
            self._queued_items -= len(items)
            for it in items:
                it.req.queued -= 1
            self.metrics.queue_depth.labels(model=model).set(len(self._pending[model]))
            items = self._live_items(items, now)
            if not items:
                continue
            self._dispatch(_Batch(model, items))
        if self._queued_items:
            # keep polling is_cancelled while units wait for a worker
            wake_at = min(wake_at, now + _CANCEL_SWEEP_S)
        self._arm(wake_at)

    def _live_items(self, items: list[_Item], now: float) -> list[_Item]:
        """Drop units whose request ended, expired or was abandoned by its client."""
        checked: dict[int, bool] = {}
        live = []
        for it in items:
            req = it.req
            ok = checked.get(id(req))
            if ok is None:
                ok = self._still_wanted(req, now)
                checked[id(req)] = ok
            if ok:
                live.append(it)
            else:
                self.metrics.dropped_items.labels(reason=req.drop_reason).inc()
        return live

    def _still_wanted(self, req: _Request, now: float) -> bool:
        if req.done:
            return False
        if now >= req.deadline:
            self._expire(req)
            return False
        if req.is_cancelled is not None:
            try:
                gone = bool(req.is_cancelled())
            except Exception:
                log.exception("is_cancelled callback raised; treating the request as cancelled")
                gone = True
            if gone:
                self._finish(req, error=CancelledRequestError("the client went away"), reason="cancelled")
                return False
        return True

    def _sweep(self, now: float) -> None:
        self._last_sweep = now
        seen: set[int] = set()
        for pend in list(self._pending.values()):
            for it in list(pend):
                req = it.req
                if id(req) in seen:
                    continue
                seen.add(id(req))
                self._still_wanted(req, now)

    def _arm(self, at: float) -> None:
        if at == math.inf:
            return
        if self._timer is not None and self._timer_at <= at and self._timer_at > time.monotonic():
            return
        if self._timer is not None:
            self._timer.cancel()
        assert self._loop is not None
        self._timer_at = at
        self._timer = self._loop.call_later(max(0.0, at - time.monotonic()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        self._pump()

    def _dispatch(self, batch: _Batch) -> None:
        self._idle -= 1
        self._inflight += 1
        self.metrics.inflight_batches.set(self._inflight)
        self._jobs.put(batch)

    # ------------------------------------------------------------------ workers (threads)
    def _post(self, fn: Callable[..., Any], *args: Any) -> None:
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
            loop.call_soon_threadsafe(fn, *args)

    def _worker_main(self, wid: int) -> None:
        current: _Batch | None = None
        clean = False
        try:
            while True:
                batch = self._jobs.get()
                if batch is None:
                    clean = True
                    return
                current = batch
                self._run_batch(batch)
                current = None
        except _WorkerKilled:
            pass  # the simulated crash ends the thread like a real one, without a traceback
        finally:
            if not clean:
                log.error("inference worker %d died", wid)
            self._post(self._on_worker_exit, wid, current, clean)

    def _run_batch(self, batch: _Batch) -> None:
        error: BaseException | None = None
        rows: npt.NDArray[np.float32] | None = None
        try:
            model = self.models[batch.model]
            items = [it for it in batch.items if not it.req.done]
            batch.ran = items
            faults = {it.req.fault for it in items if it.req.fault}
            if faults:
                items = self._inject(faults, items)
                batch.ran = items
            if items:
                batch.started = time.monotonic()
                t = time.perf_counter()
                out = model.forward([it.req.prepared.units[it.index] for it in items])
                batch.elapsed = time.perf_counter() - t
                rows = np.asarray(out, dtype=np.float32).reshape(len(items), -1)
        except Exception as e:  # the batch fails, the worker lives on
            error = e
        self._post(self._on_batch_done, batch, rows, error)

    def _inject(self, faults: set[str], items: list[_Item]) -> list[_Item]:
        """Fault injection (tests only, ``Settings.fault_injection``): slow, failing or dying batches."""
        for f in sorted(faults):
            if f.startswith("slow:"):
                try:
                    ms = float(f.split(":", 1)[1])
                except ValueError:
                    ms = 0.0
                time.sleep(max(0.0, ms) / 1000.0)
        if "kill_worker" in faults:
            raise _WorkerKilled("fault injection: kill_worker")
        if "fail_batch" in faults:
            raise ModelError("fault injection: fail_batch")
        # units may have been abandoned while we slept
        return [it for it in items if not it.req.done]

    # ------------------------------------------------------------------ worker reports (loop thread)
    def _on_batch_done(
        self, batch: _Batch, rows: npt.NDArray[np.float32] | None, error: BaseException | None
    ) -> None:
        self._idle += 1
        self._inflight -= 1
        self.metrics.inflight_batches.set(self._inflight)
        try:
            self._settle(batch, rows, error)
        except Exception:
            log.exception("scheduler error while routing batch results")
            for req in {id(it.req): it.req for it in batch.items}.values():
                self._finish(req, error=ModelError("internal scheduler error"), reason="error")
        self._pump()

    def _settle(
        self, batch: _Batch, rows: npt.NDArray[np.float32] | None, error: BaseException | None
    ) -> None:
        ran = batch.ran
        if len(ran) < len(batch.items):
            kept = {id(it) for it in ran}
            for it in batch.items:
                if id(it) not in kept:  # its request ended while the unit waited for the worker
                    self.metrics.dropped_items.labels(reason=it.req.drop_reason).inc()
        reqs = {id(it.req): it.req for it in ran}
        m = self.metrics
        if ran:
            longest = max(it.length for it in ran)
            m.batches.labels(model=batch.model).inc()
            m.batch_size.labels(model=batch.model).observe(len(ran))
            m.batch_tokens.labels(model=batch.model).observe(len(ran) * longest)
            m.batch_requests.labels(model=batch.model).observe(len(reqs))
            m.inference_seconds.labels(model=batch.model).observe(batch.elapsed)
            self._n_batches += 1
            if len(reqs) > 1:
                self._n_cross_batches += 1
        if error is not None:
            m.failed_batches.labels(model=batch.model).inc()
            log.error(
                "batch of %d units (%d requests) failed on model %s: %s",
                len(ran),
                len(reqs),
                batch.model,
                error,
                exc_info=error,
            )
            msg = error.message if isinstance(error, ModelError) else f"{type(error).__name__}: {error}"
            for req in reqs.values():
                self._finish(req, error=ModelError(f"inference failed: {msg}"), reason="error")
            return
        if rows is None:
            return
        self._observe_rate(len(ran), batch.elapsed)
        for k, it in enumerate(ran):
            req = it.req
            if req.done:
                continue
            if req.rows is None:
                req.rows = np.empty((req.n_units, rows.shape[1]), dtype=np.float32)
            req.rows[it.index] = rows[k]
            req.remaining -= 1
        for req in reqs.values():
            req.batches += 1
            req.forward_s += batch.elapsed
            req.first_start = min(req.first_start, batch.started)
            req.last_start = max(req.last_start, batch.started)
            if not req.done and req.remaining == 0:
                assert req.rows is not None
                self._finish(req, error=None, reason="ok", result=req.rows)

    def _observe_rate(self, n: int, elapsed: float) -> None:
        """Units per second the workers sustain while busy (idle gaps must not lower it)."""
        self._n_units += n
        inst = n / max(elapsed, 1e-4) * max(1, self._alive)
        self._rate = inst if self._rate == 0 else 0.8 * self._rate + 0.2 * inst

    def _on_worker_exit(self, wid: int, batch: _Batch | None, clean: bool) -> None:
        self._alive -= 1
        self.metrics.workers_alive.set(self._alive)
        if clean:
            return
        if batch is not None:
            self._inflight -= 1
            self.metrics.inflight_batches.set(self._inflight)
            for req in {id(it.req): it.req for it in batch.items}.values():
                self._finish(
                    req,
                    error=WorkerDiedError(f"inference worker {wid} died while running this request"),
                    reason="worker_died",
                )
        else:
            self._idle -= 1
        if self._alive <= 0 and not self._stopped:
            log.error("every inference worker has died; failing all queued requests")
            self._fail_all(
                lambda: WorkerDiedError("every inference worker has died; the server must be restarted"),
                "worker_died",
            )
            self._fail_waiters(lambda: WorkerDiedError("every inference worker has died"))
        else:
            self._pump()

"""The ``Scheduler`` facade: cross-request dynamic batching over any ``Runner``.

Why this exists: one request rarely fills a batch, and running each request alone wastes the
throughput that padding-aware batching gives. The scheduler pools the *units* (tokenized
sequences) of every concurrent request, cuts them into length-sorted batches under the token
budget, runs those batches on worker threads and routes each row back to its request.

The parts: ``admission`` (capacity, Retry-After), ``pending`` (requests, their queued units and
the one exit every request takes), ``policy`` (a pure function: which units go next),
``workers`` (threads, liveness), ``results`` (rows back to their requests). This module wires them
together on the event loop thread, so the bookkeeping needs no locks. There is no batcher task
that could die silently: ``_pump`` is a plain function called whenever something changes (a
request arrives, a batch finishes, a request gives up, a timer fires), and a failure inside it
fails the queued requests instead of leaving them pending.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import enum
import functools
import logging
import math
import os
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import numpy as np

from encapure.engine.types import Prepared
from encapure.errors import (
    DeadlineExceededError,
    ModelError,
    ModelNotFoundError,
    NotReadyError,
    ShuttingDownError,
    WorkerDiedError,
)
from encapure.scheduler.admission import Admission
from encapure.scheduler.faults import FaultyRunner
from encapure.scheduler.metrics import SchedulerMetrics
from encapure.scheduler.pending import Batch, InProgress
from encapure.scheduler.policy import Limits, next_batch, window_size
from encapure.scheduler.results import Totals, settle
from encapure.scheduler.workers import Rows, Runner, WorkerPool
from encapure.settings import Settings

log = logging.getLogger("encapure.scheduler")

T = TypeVar("T")

# How often queued requests are asked whether their client is still there.
_CANCEL_SWEEP_S = 0.05
# The settings that shape scheduling, as stats() reports them.
_LIMITS = (
    "max_batch_tokens",
    "max_batch_size",
    "max_wait_ms",
    "max_concurrent_requests",
    "max_queued_items",
    "admission_timeout_s",
    "request_timeout_s",
)


class Phase(enum.Enum):
    NEW = "new"  # not started: nothing is admitted
    RUNNING = "running"  # admitting work
    DRAINING = "draining"  # shutdown began: work in progress finishes, new work is refused
    STOPPED = "stopped"  # workers told to exit


class Scheduler:
    """Queues the units of concurrent requests and runs them in shared batches on worker threads.

    One scheduler serves several models (batches never mix models); ``Settings.workers`` threads
    take batches of any model (``Settings`` has checked the knobs' ranges). Use from one event
    loop: ``await start()``, then ``run`` (or ``prepare`` + ``submit``) from request handlers,
    ``await shutdown(timeout)`` at the end.
    """

    def __init__(
        self,
        models: Mapping[str, Runner],
        settings: Settings,
        metrics: SchedulerMetrics | None = None,
    ) -> None:
        self.models: dict[str, Runner] = dict(models)
        self.settings = settings
        self.metrics = metrics if metrics is not None else SchedulerMetrics()
        runners: dict[str, Runner] = dict(models)
        if settings.fault_injection:  # tests only: the production path has no fault checks
            runners = {name: FaultyRunner(r) for name, r in runners.items()}
        self.phase = Phase.NEW
        self._loop: asyncio.AbstractEventLoop | None = None
        self.workers = WorkerPool(runners, settings.workers, self._on_batch_done, self._on_worker_exit)
        self._prep_pool: concurrent.futures.ThreadPoolExecutor | None = None
        s = settings
        self.admission = Admission(s.max_concurrent_requests, s.max_queued_items, s.admission_timeout_s, self.metrics)
        self.inprogress = InProgress(list(self.models), self.admission, self.metrics, s.request_timeout_s)
        self.pending = self.inprogress.pending
        # Prepared objects whose tokenization began before shutdown: still admitted while draining
        # (keyed by id: Prepared is an unhashable dataclass; an entry dies with its object)
        self._grace: weakref.WeakValueDictionary[int, Prepared] = weakref.WeakValueDictionary()
        # When nothing else is coming, cut the last batch into parts for the idle workers.
        self.split_idle = True
        self._preparing = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._last_sweep = 0.0
        self.totals = Totals()
        self.metrics.workers_alive.set(0)
        for name in self.models:
            self.metrics.queue_depth.labels(model=name).set(0)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Start the inference worker threads; binds the scheduler to the running event loop."""
        if self.phase is not Phase.NEW:
            return
        self._loop = asyncio.get_running_loop()
        n_prep = max(2, min(4, os.cpu_count() or 2))
        self._prep_pool = concurrent.futures.ThreadPoolExecutor(n_prep, thread_name_prefix="encapure-prepare")
        self.workers.start(self._loop)
        self.metrics.workers_alive.set(self.workers.alive)
        self.phase = Phase.RUNNING

    async def shutdown(self, timeout: float) -> None:
        """Stop admitting, let work already in progress finish for up to ``timeout`` s, fail the rest.

        Draining: ``is_accepting()`` turns False and new ``prepare``/``submit`` calls get
        ``ShuttingDownError`` at once, but everything already in progress is carried to the end:
        admitted requests, requests waiting for admission (within their admission timeout), and
        requests whose ``prepare`` began before the shutdown (their ``submit`` is still admitted).
        At the timeout whatever is left gets ``ShuttingDownError``; then the workers stop.
        """
        if self.phase in (Phase.NEW, Phase.STOPPED):
            return
        self.phase = Phase.DRAINING
        end = time.monotonic() + max(0.0, timeout)
        adm = self.admission
        while time.monotonic() < end and (
            self.inprogress.requests or adm.waiters or adm.reserved or self._preparing or len(self._grace)
        ):
            await asyncio.sleep(0.005)
        adm.fail_waiters(lambda: ShuttingDownError("the server is shutting down", retry_after=None))
        self.inprogress.fail_all(
            lambda: ShuttingDownError("the server shut down before this request finished", retry_after=None),
            "shutdown",
        )
        self.phase = Phase.STOPPED
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.workers.stop()
        await self.workers.join(end)
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
        self.phase = Phase.STOPPED
        self.workers.stop()
        if self._prep_pool is not None:
            self._prep_pool.shutdown(wait=False, cancel_futures=True)

    def _check_loop(self) -> None:
        if not self.bound_to_running_loop():
            raise RuntimeError("this Scheduler was started in another event loop; create and start one per loop")

    def is_healthy(self) -> bool:
        """Liveness: started, not stopped, and every inference worker thread alive."""
        return self.phase in (Phase.RUNNING, Phase.DRAINING) and self.workers.healthy()

    def is_accepting(self) -> bool:
        """Whether new work is admitted (started, not draining, at least one worker alive)."""
        return self.phase is Phase.RUNNING and self.workers.alive > 0

    def stats(self) -> dict[str, Any]:
        """A snapshot for ``/info``, logs and tests."""
        s, adm, w = self.settings, self.admission, self.workers
        return {
            "started": self.phase is not Phase.NEW,
            "phase": self.phase.value,
            "accepting": self.is_accepting(),
            "healthy": self.is_healthy(),
            "workers": len(w.threads),
            "workers_alive": w.alive,
            "workers_idle": w.idle,
            "inflight_batches": w.inflight,
            "active_requests": len(self.inprogress.requests),
            "waiting_admission": len(adm.waiters),
            "items_in_system": adm.items,
            "queued_items": self.pending.queued,
            "queued_by_model": {m: len(p) for m, p in self.pending.by_model.items()},
            "preparing": self._preparing,
            "batches": self.totals.batches,
            "units_computed": self.totals.units,
            "cross_request_batches": self.totals.cross_request_batches,
            "units_per_second": round(adm.rate, 1),
            "limits": {k: getattr(s, k) for k in _LIMITS},
        }

    # ------------------------------------------------------------------ public API
    async def run(
        self,
        model: str,
        prepare: Callable[[], Prepared],
        finish: Callable[[Prepared, Rows], T],
        *,
        deadline: float | None = None,
        is_cancelled: Callable[[], bool] | None = None,
        timings: dict[str, float] | None = None,
    ) -> T:
        """The whole inference flow of one request: ``prepare`` (tokenization, off the loop) ->
        admission -> queue -> shared batches -> ``finish(prepared, rows)``.

        ``timings`` gets ``prepare_s`` besides what ``submit`` fills in. Raises what ``prepare``,
        ``submit`` and ``finish`` raise.
        """
        t0 = time.perf_counter()
        prepared = await self.prepare(prepare)
        if timings is not None:
            timings["prepare_s"] = time.perf_counter() - t0
        rows = await self.submit(model, prepared, deadline=deadline, is_cancelled=is_cancelled, timings=timings)
        if rows.dtype == object and self._loop is not None and self._prep_pool is not None:
            # Token-level rows (ColBERT MaxSim, /embed_all): their post-processing is real work
            # (milliseconds for a large request), so it runs off the loop too.
            return await self._loop.run_in_executor(self._prep_pool, finish, prepared, rows)
        return finish(prepared, rows)

    async def prepare(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` (tokenization) on a small thread pool, off the event loop.

        While a call is running the batcher knows more work is on its way, so a partial batch
        waits up to ``max_wait_ms`` for it; with nothing in preparation it goes out at once.
        """
        if self.phase is Phase.NEW:
            raise NotReadyError("the scheduler is not started")
        self._check_loop()
        if self.phase is not Phase.RUNNING:
            raise ShuttingDownError("the server is shutting down", retry_after=None)
        assert self._loop is not None and self._prep_pool is not None
        self._preparing += 1
        try:
            result = await self._loop.run_in_executor(self._prep_pool, functools.partial(fn, *args, **kwargs))
        finally:
            self._preparing -= 1
        if self.phase is Phase.DRAINING:
            # began before the shutdown: this request is already in progress, let it finish
            with contextlib.suppress(TypeError):  # not weak-referenceable: no grace
                self._grace[id(result)] = result
        return result

    async def submit(
        self,
        model: str,
        prepared: Prepared,
        *,
        deadline: float | None = None,
        is_cancelled: Callable[[], bool] | None = None,
        timings: dict[str, float] | None = None,
    ) -> Rows:
        """Queue a prepared request, wait for its batches, return its raw rows in unit order.

        ``deadline`` is absolute ``time.monotonic()`` seconds (default: now + request_timeout_s);
        ``is_cancelled`` is polled while the units wait (a client that went away); cancelling the
        awaiting task has the same effect. ``timings``, when given, is filled with
        ``admission_s``, ``queue_s`` (admission -> last unit started), ``inference_s`` (first unit
        started -> done), ``forward_s`` and ``batches``. A request without units (empty input)
        gets ``[0, 0]`` rows at once: the engine's ``finish`` builds its empty result.

        Raises ``ModelNotFoundError``, ``OverloadedError`` (no capacity within
        admission_timeout_s; ``retry_after`` set), ``DeadlineExceededError``,
        ``ShuttingDownError``, ``ModelError`` (its batch failed), ``WorkerDiedError``,
        ``CancelledRequestError`` (``is_cancelled`` turned true), ``NotReadyError`` (not started).
        """
        t0 = time.monotonic()
        if self.phase is Phase.NEW:
            raise NotReadyError("the scheduler is not started")
        self._check_loop()
        if self.phase is Phase.STOPPED or not (self.phase is Phase.RUNNING or self._take_grace(prepared)):
            self.metrics.rejected_requests.labels(reason="shutting_down").inc()
            raise ShuttingDownError("the server is shutting down", retry_after=None)
        if model not in self.models:
            known = ", ".join(sorted(self.models)) or "none"
            raise ModelNotFoundError(f"model {model!r} is not served here (served: {known})")
        if self.workers.alive == 0:
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

        await self.admission.admit(n, deadline)
        self.admission.claim()
        loop = self._loop
        assert loop is not None
        now = time.monotonic()
        if timings is not None:
            timings["admission_s"] = now - t0
        if self.phase is Phase.STOPPED or self.workers.alive == 0:  # changed while we waited for admission
            self.admission.release(n)
            if self.workers.alive == 0:
                raise WorkerDiedError("every inference worker has died; the server must be restarted")
            raise ShuttingDownError("the server is shutting down", retry_after=None)
        req = self.inprogress.open(
            loop, model, prepared, deadline=deadline, is_cancelled=is_cancelled, timings=timings, now=now
        )
        self._pump()
        try:
            return await req.future
        except asyncio.CancelledError:
            # the awaiting task was cancelled (client went away): drop what is not computed yet
            self.inprogress.finish(req, error=None, reason="cancelled")
            raise

    def _take_grace(self, prepared: Prepared) -> bool:
        if self._grace.get(id(prepared)) is prepared:
            del self._grace[id(prepared)]
            return True
        return False

    # ------------------------------------------------------------------ batching
    def _pump(self) -> None:
        """Hand batches to idle workers; (re)arm the timer for the next decision."""
        if self.phase is Phase.STOPPED:
            return
        try:
            self._pump_inner()
        except Exception:
            # A bug here may have taken units off the queue without dispatching them; which ones is
            # unknowable, so every request in progress is failed rather than any left pending.
            log.exception("scheduler error; failing every request in progress")
            self.inprogress.fail_all(lambda: ModelError("internal scheduler error"), "error")

    def _pump_inner(self) -> None:
        now = time.monotonic()
        if self.pending.queued and now - self._last_sweep >= _CANCEL_SWEEP_S:
            self.inprogress.sweep(now)
        s = self.settings
        limits = Limits(s.max_batch_tokens, s.max_batch_size, s.max_wait_ms / 1000.0, self.split_idle)
        n_window = window_size(limits)
        wake_at = math.inf
        while self.workers.idle > 0 and (model := self.pending.oldest_model()) is not None:
            pend = self.pending.by_model[model]
            window = pend[:n_window]  # the policy looks at no more than this
            decision = next_batch(
                [it.length for it in window],
                [now - it.req.admitted for it in window],
                idle_workers=self.workers.idle,
                preparing=self._preparing > 0,
                limits=limits,
                queued=len(pend),
            )
            if not decision.take:
                if decision.wait_s is not None:
                    wake_at = min(wake_at, now + decision.wait_s)
                break
            items = self.pending.take(model, decision.take)
            self.metrics.queue_depth.labels(model=model).set(len(self.pending.by_model[model]))
            items = self.inprogress.live_items(items, now)
            if items:
                self.workers.dispatch(Batch(model, items))
                self.metrics.inflight_batches.set(self.workers.inflight)
        if self.pending.queued:
            # keep polling is_cancelled while units wait for a worker
            wake_at = min(wake_at, now + _CANCEL_SWEEP_S)
        self._arm(wake_at)

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

    # ------------------------------------------------------------------ worker reports (loop thread)
    def _on_batch_done(self, batch: Batch, rows: Rows | None, error: BaseException | None) -> None:
        self.metrics.inflight_batches.set(self.workers.inflight)
        try:
            n = settle(batch, rows, error, self.metrics, self.totals, self.inprogress.finish)
            if n:
                self.admission.observe(n, batch.elapsed, self.workers.alive)
        except Exception:
            log.exception("scheduler error while routing batch results")
            for req in batch.requests():
                self.inprogress.finish(req, error=ModelError("internal scheduler error"), reason="error")
        self._pump()

    def _on_worker_exit(self, wid: int, batch: Batch | None, clean: bool) -> None:
        self.metrics.workers_alive.set(self.workers.alive)
        if clean:
            return
        if batch is not None:
            self.metrics.inflight_batches.set(self.workers.inflight)
            for req in batch.requests():
                self.inprogress.finish(
                    req,
                    error=WorkerDiedError(f"inference worker {wid} died while running this request"),
                    reason="worker_died",
                )
        if self.workers.alive <= 0 and self.phase is not Phase.STOPPED:
            log.error("every inference worker has died; failing all queued requests")
            self.inprogress.fail_all(
                lambda: WorkerDiedError("every inference worker has died; the server must be restarted"),
                "worker_died",
            )
            self.admission.fail_waiters(lambda: WorkerDiedError("every inference worker has died"))
        else:
            self._pump()

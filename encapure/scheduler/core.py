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

from encapure.engine.estimate import WorkEstimate
from encapure.engine.types import Prepared
from encapure.errors import (
    CancelledRequestError,
    DeadlineExceededError,
    ModelError,
    ModelNotFoundError,
    NotReadyError,
    PayloadTooLargeError,
    ShuttingDownError,
    WorkerDiedError,
)
from encapure.scheduler.admission import TOKENIZER_WEIGHT, Admission, Ticket, unit_work
from encapure.scheduler.faults import FaultyRunner
from encapure.scheduler.metrics import SchedulerMetrics
from encapure.scheduler.pending import Batch, InProgress, Item
from encapure.scheduler.policy import Limits, fair_order, heavy_may_run, is_heavy, next_batch, window_size
from encapure.scheduler.results import Totals, settle
from encapure.scheduler.workers import Rows, Runner, WorkerPool
from encapure.settings import Settings

log = logging.getLogger("encapure.scheduler")

T = TypeVar("T")

# Busy seconds per throughput sample (work completed / wall time while batches ran).
_RATE_SAMPLE_S = 0.5
# How often queued requests are asked whether their client is still there.
_CANCEL_SWEEP_S = 0.05
# The settings that shape scheduling, as stats() reports them.
_LIMITS = (
    "max_batch_tokens",
    "max_batch_size",
    "max_wait_ms",
    "max_concurrent_requests",
    "max_queued_items",
    "max_units_per_request",
    "admission_timeout_s",
    "request_timeout_s",
    "admission_deadline_share",
    "admission_backlog_share",
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
        *,
        request_caps: bool = True,
    ) -> None:
        """``request_caps=False`` (the library's own schedulers): no per-request size limits. They
        keep one HTTP client from crowding out the others; a library caller asked for all of its
        work, which still has its deadline and the admission's bounds."""
        self.models: dict[str, Runner] = dict(models)
        self.settings = settings
        self.request_caps = request_caps
        self.metrics = metrics if metrics is not None else SchedulerMetrics()
        runners: dict[str, Runner] = dict(models)
        if settings.fault_injection:  # tests only: the production path has no fault checks
            runners = {name: FaultyRunner(r) for name, r in runners.items()}
        self.phase = Phase.NEW
        self._loop: asyncio.AbstractEventLoop | None = None
        self.workers = WorkerPool(runners, settings.workers, self._on_batch_done, self._on_worker_exit)
        self._prep_pool: concurrent.futures.ThreadPoolExecutor | None = None
        s = settings
        self.admission = Admission(
            s.max_concurrent_requests,
            s.max_queued_items,
            s.admission_timeout_s,
            self.metrics,
            s.request_timeout_s,
            deadline_share=s.admission_deadline_share,
            backlog_share=s.admission_backlog_share,
            # until the throughput is measured: one full batch per worker (see admission.py)
            cold_work=s.workers * unit_work(s.max_batch_tokens, s.max_batch_size),
        )
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
        self._heavy_inflight = 0  # batches of heavy requests on workers now
        # throughput over busy time: work completed and busy seconds since the last sample
        self._busy_mark = 0.0
        self._busy_work = 0.0
        self._busy_s = 0.0
        self.totals = Totals()
        self.metrics.workers_alive.set(0)
        for name in self.models:
            self.metrics.queue_depth.labels(model=name).set(0)
        self.metrics.throughput.set(self.admission.throughput)

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
            "queued_by_model": {m: self.pending.depth(m) for m in self.pending.by_model},
            "preparing": self._preparing,
            "batches": self.totals.batches,
            "units_computed": self.totals.units,
            "cross_request_batches": self.totals.cross_request_batches,
            "units_discarded": self.totals.discarded,
            "work_per_second": round(adm.throughput, 1),
            "admitted_work_s": round(adm.drain_s(), 3),
            "limits": {k: getattr(s, k) for k in _LIMITS},
        }

    def refuse_early(self, min_work: float, deadline: float) -> float | None:
        """Before a request is even read: when any request of at least ``min_work`` (see
        ``admission.MIN_REQUEST_WORK``) would be refused as overloaded at once, count the refusal
        and return its Retry-After in seconds; else None (the request goes the normal way, which
        may still wait for room or refuse it). So in a retry storm a refusal costs no body read, no
        parsing and no tokenizing: the work it would have taken from inference."""
        if self.phase is not Phase.RUNNING or self.workers.alive == 0:
            return None  # not started, draining, dead: the normal path says which
        if not self.admission.refuses_now(min_work, deadline):
            return None
        self.metrics.rejected_requests.labels(reason="overloaded").inc()
        return self.admission.retry_after()

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
        estimate: WorkEstimate | None = None,
    ) -> T:
        """The whole inference flow of one request: admission -> ``prepare`` (tokenization, off
        the loop) -> queue -> shared batches -> ``finish(prepared, rows)``.

        With ``estimate`` (the request's size bounded from its characters, see
        ``encapure.engine.estimate``) admission comes first: a refused request is never
        tokenized, only admitted requests tokenize (on a small pool), and room is re-counted with
        the real size afterwards. Without one the request is tokenized first and admitted by its
        real size. ``timings`` gets ``prepare_s`` besides what ``submit`` fills in. Raises what
        ``prepare``, ``submit`` and ``finish`` raise, and ``PayloadTooLargeError`` for a request
        of more than ``max_units_per_request`` units.
        """
        if estimate is None:
            t0 = time.perf_counter()
            prepared = await self.prepare(prepare)
            if timings is not None:
                timings["prepare_s"] = time.perf_counter() - t0
            rows = await self.submit(model, prepared, deadline=deadline, is_cancelled=is_cancelled, timings=timings)
            return await self._finish(finish, prepared, rows)
        t0 = time.monotonic()
        self._check_open(model)
        if deadline is None:
            deadline = t0 + self.settings.request_timeout_s
        cap = self.settings.max_units_per_request if self.request_caps else 1 << 62
        if estimate.inputs > cap:
            self._too_large(estimate.inputs, at_least=True)
        # room for its likely size (the real one replaces it after tokenization), never more than
        # one request may bring (a request bigger than that is refused once its size is known)
        units = max(1, min(estimate.likely_units or estimate.units, cap))
        tokens = min(estimate.likely_tokens or estimate.tokens, units * estimate.unit_max)
        reserve = min(unit_work(tokens, units), self.admission.max_single_work())
        ticket = await self.admission.admit(units, reserve, deadline)
        handed = False
        try:
            if timings is not None:
                timings["admission_s"] = time.monotonic() - t0
            t1 = time.perf_counter()
            prepared = await self._tokenize(prepare, deadline, is_cancelled)
            if timings is not None:
                timings["prepare_s"] = time.perf_counter() - t1
            n = len(prepared.units)
            if n > cap:
                self._too_large(n)
            if n == 0:
                return finish(prepared, np.empty((0, 0), dtype=np.float32))
            work = unit_work(sum(len(u) for u in prepared.units), n)
            self._check_doable(n, work, deadline)
            self.admission.resize(ticket, n, work)
            handed = True
            rows = await self._enqueue(model, prepared, ticket, deadline, is_cancelled, timings)
        finally:
            if not handed:
                self.admission.release(ticket, claimed=False)
        return await self._finish(finish, prepared, rows)

    async def _finish(self, finish: Callable[[Prepared, Rows], T], prepared: Prepared, rows: Rows) -> T:
        if rows.dtype == object and self._loop is not None and self._prep_pool is not None:
            # Token-level rows (ColBERT MaxSim, /embed_all): their post-processing is real work
            # (milliseconds for a large request), so it runs off the loop too.
            return await self._loop.run_in_executor(self._prep_pool, finish, prepared, rows)
        return finish(prepared, rows)

    async def run_tokenizer(
        self,
        fn: Callable[[], T],
        *,
        tokens: int,
        deadline: float | None = None,
        is_cancelled: Callable[[], bool] | None = None,
    ) -> T:
        """Tokenizer-only work (``/tokenize``, ``/decode``): admitted like inference (weighed at
        ``TOKENIZER_WEIGHT`` of a forward pass per token), run on the tokenization pool, bound by
        the deadline. ``tokens`` bounds the request's tokens."""
        t0 = time.monotonic()
        if self.phase is Phase.NEW:
            raise NotReadyError("the scheduler is not started")
        self._check_loop()
        if self.phase is not Phase.RUNNING:
            self.metrics.rejected_requests.labels(reason="shutting_down").inc()
            raise ShuttingDownError("the server is shutting down", retry_after=None)
        if deadline is None:
            deadline = t0 + self.settings.request_timeout_s
        ticket = await self.admission.admit(0, unit_work(round(tokens * TOKENIZER_WEIGHT), 1), deadline)
        try:
            return await self._tokenize(fn, deadline, is_cancelled)
        finally:
            self.admission.release(ticket, claimed=False)

    async def _tokenize(
        self, fn: Callable[[], T], deadline: float, is_cancelled: Callable[[], bool] | None
    ) -> T:
        """``fn`` on the tokenization pool for an admitted request; skipped when, by the time a
        thread takes it, its deadline passed or its client left; abandoned at the deadline."""
        assert self._loop is not None and self._prep_pool is not None

        def guarded() -> T:
            if time.monotonic() >= deadline:
                raise DeadlineExceededError("the request deadline passed before it was tokenized")
            if is_cancelled is not None and is_cancelled():
                raise CancelledRequestError("the client went away")
            return fn()

        self._preparing += 1
        try:
            fut = self._loop.run_in_executor(self._prep_pool, guarded)
            try:
                return await asyncio.wait_for(fut, timeout=max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise DeadlineExceededError("the request deadline passed while it was tokenized") from None
        finally:
            self._preparing -= 1

    def _check_open(self, model: str, accepting: Callable[[], bool] | None = None) -> None:
        """Refuse what cannot run: not started, shutting down (unless ``accepting`` grants a drain
        grace), an unknown model, or no live worker."""
        if self.phase is Phase.NEW:
            raise NotReadyError("the scheduler is not started")
        self._check_loop()
        if not (accepting() if accepting is not None else self.phase is Phase.RUNNING):
            self.metrics.rejected_requests.labels(reason="shutting_down").inc()
            raise ShuttingDownError("the server is shutting down", retry_after=None)
        if model not in self.models:
            known = ", ".join(sorted(self.models)) or "none"
            raise ModelNotFoundError(f"model {model!r} is not served here (served: {known})")
        if self.workers.alive == 0:
            self.metrics.rejected_requests.labels(reason="worker_died").inc()
            raise WorkerDiedError("every inference worker has died; the server must be restarted")

    def _too_large(self, units: int, *, at_least: bool = False) -> None:
        cap = self.settings.max_units_per_request
        self.metrics.rejected_requests.labels(reason="too_large").inc()
        need = f"at least {units}" if at_least else str(units)
        raise PayloadTooLargeError(
            f"this request needs {need} units (one per input, plus one per extra window of a long "
            f"document); this server takes at most {cap} per request (--max-units-per-request): "
            "split it into smaller requests"
        )

    def forget_throughput(self) -> None:
        """Drop the throughput estimate (see ``Admission.forget``): called after warm-up work."""
        self.admission.forget()
        self._busy_work = self._busy_s = 0.0
        self._busy_mark = time.monotonic()

    def _check_doable(self, units: int, work: float, deadline: float) -> None:
        """A request that could not finish before its deadline even on an idle server (at the
        measured throughput, on the workers a heavy request may hold) is refused now rather than
        computed and thrown away at the deadline.

        Never a request that fits in one full batch: that is the least any server must serve, and
        refusing it on an estimate that is wrong could last for good (nothing admitted, nothing
        measured again); at worst one batch is computed after its deadline."""
        adm = self.admission
        if adm.rate <= 0 or not self.request_caps:
            return  # not measured yet (no grounds to refuse), or a library call
        if units <= self.settings.max_batch_size and work <= unit_work(self.settings.max_batch_tokens,
                                                                       self.settings.max_batch_size):
            return
        alive = max(1, self.workers.alive)
        share = (alive - 1) / alive if alive > 1 and is_heavy(work, self._limits()) else 1.0
        need = work / (adm.rate * share)  # on the workers it may hold
        allowed = adm.deadline_share * max(0.0, deadline - time.monotonic())
        if need > allowed or work > adm.max_single_work():
            self.metrics.rejected_requests.labels(reason="too_large").inc()
            limit = min(allowed, need * adm.max_single_work() / work)
            raise PayloadTooLargeError(
                f"this request ({units} units) needs about {need:.1f} s of compute at the measured "
                f"throughput; one request may take at most {limit:.1f} s here (its deadline, and room "
                "for other requests beside it): split it into smaller requests"
            )

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
        ``CancelledRequestError`` (``is_cancelled`` turned true), ``NotReadyError`` (not started),
        ``PayloadTooLargeError`` (more than ``max_units_per_request`` units).
        """
        t0 = time.monotonic()
        self._check_open(model, lambda: self.phase is not Phase.STOPPED
                         and (self.phase is Phase.RUNNING or self._take_grace(prepared)))
        n = len(prepared.units)
        if deadline is None:
            deadline = t0 + self.settings.request_timeout_s
        if n == 0:
            return np.empty((0, 0), dtype=np.float32)
        if self.request_caps and n > self.settings.max_units_per_request:
            self._too_large(n)
        if deadline <= t0:
            self.metrics.dropped_items.labels(reason="deadline").inc(n)
            raise DeadlineExceededError("the request deadline passed before it could be queued")
        work = unit_work(sum(len(u) for u in prepared.units), n)
        self._check_doable(n, work, deadline)
        ticket = await self.admission.admit(n, work, deadline)
        if timings is not None:
            timings["admission_s"] = time.monotonic() - t0
        return await self._enqueue(model, prepared, ticket, deadline, is_cancelled, timings)

    async def _enqueue(
        self,
        model: str,
        prepared: Prepared,
        ticket: Ticket,
        deadline: float,
        is_cancelled: Callable[[], bool] | None,
        timings: dict[str, float] | None,
    ) -> Rows:
        """An admitted request (its room granted as ``ticket``) registers, queues and is awaited."""
        self.admission.claim()
        loop = self._loop
        assert loop is not None
        now = time.monotonic()
        if self.phase is Phase.STOPPED or self.workers.alive == 0:  # changed while we waited for admission
            self.admission.release(ticket)
            if self.workers.alive == 0:
                raise WorkerDiedError("every inference worker has died; the server must be restarted")
            raise ShuttingDownError("the server is shutting down", retry_after=None)
        req = self.inprogress.open(
            loop, model, prepared, deadline=deadline, is_cancelled=is_cancelled, timings=timings, now=now,
            ticket=ticket,
        )
        req.heavy = is_heavy(req.work, self._limits())
        self._pump()
        try:
            return await req.future
        except asyncio.CancelledError:
            # the awaiting task was cancelled (client went away): drop what is not computed yet
            self.inprogress.finish(req, error=None, reason="cancelled")
            raise

    def _limits(self) -> Limits:
        s = self.settings
        return Limits(s.max_batch_tokens, s.max_batch_size, s.max_wait_ms / 1000.0, self.split_idle)

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
        limits = self._limits()
        n_window = window_size(limits)
        rate = self.admission.throughput
        wake_at = math.inf
        while self.workers.idle > 0 and (model := self.pending.oldest_model()) is not None:
            allow_heavy = heavy_may_run(self._heavy_inflight, self.workers.alive)
            reqs = [r for r in self.pending.by_model[model] if allow_heavy or not r.heavy]
            if not reqs:
                break  # only heavy work queued and it holds every worker but one: keep that one free
            # the window: the units of the requests in fair order (least remaining work, aged)
            order = fair_order([r.queued_work / rate for r in reqs], [now - r.admitted for r in reqs])
            window: list[Item] = []
            for i in order:
                window.extend(reqs[i].queue[: n_window - len(window)])
                if len(window) >= n_window:
                    break
            decision = next_batch(
                [it.length for it in window],
                [now - it.req.admitted for it in window],
                idle_workers=self.workers.idle,
                preparing=self._preparing > 0,
                limits=limits,
                queued=sum(r.queued for r in reqs),
            )
            if not decision.take:
                if decision.wait_s is not None:
                    wake_at = min(wake_at, now + decision.wait_s)
                break
            items = self.pending.take(model, [window[i] for i in decision.take])
            self.metrics.queue_depth.labels(model=model).set(self.pending.depth(model))
            items = self.inprogress.live_items(items, now)
            if items:
                batch = Batch(model, items, heavy=any(it.req.heavy for it in items))
                if batch.heavy:
                    self._heavy_inflight += 1
                if self.workers.inflight == 0:
                    self._busy_mark = time.monotonic()  # busy from now: throughput is measured
                self.workers.dispatch(batch)
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
        if batch.heavy:
            self._heavy_inflight -= 1
        try:
            work = 0.0
            if error is None and rows is not None:
                for it in batch.ran:
                    w = unit_work(it.length)
                    work += w
                    if it.req.ticket is not None and not it.req.done:
                        self.admission.computed(it.req.ticket, w)
            n = settle(batch, rows, error, self.metrics, self.totals, self.inprogress.finish)
            now = time.monotonic()
            self._busy_s += now - self._busy_mark
            self._busy_mark = now
            self._busy_work += work
            if n and work:
                self.admission.observe(work, batch.elapsed, self.workers.alive)
            if self._busy_s >= _RATE_SAMPLE_S:
                self.admission.observe_busy(self._busy_work, self._busy_s)
                self._busy_work = self._busy_s = 0.0
            self.metrics.throughput.set(self.admission.throughput)
            self.admission.poke()
            self.metrics.admitted_work_seconds.set(self.admission.drain_s())
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
            if batch.heavy:
                self._heavy_inflight -= 1
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

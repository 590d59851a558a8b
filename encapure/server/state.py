"""The service's lifecycle state: loaded models, the scheduler, phase and in-flight work.

Phases: ``starting`` (loading and warming; /ready 503, work 503) -> ``ready`` -> ``draining``
(after SIGTERM: /ready 503, new work 503, in-flight work finishes) -> ``stopped``; ``failed`` when
loading failed (the process then exits non-zero).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

import numpy as np
from prometheus_client import CollectorRegistry

from encapure.engine.types import InferenceModel, Unit
from encapure.errors import NotReadyError, ShuttingDownError
from encapure.scheduler.metrics import SchedulerMetrics
from encapure.server.errors import error_kinds
from encapure.server.loading import ModelSpec, load_spec, parse_specs, sized_settings
from encapure.server.memory import IdleTrim
from encapure.server.metrics import HttpMetrics
from encapure.settings import Settings

log = logging.getLogger("encapure.server")
# The longest sequences of the start-up warm-up: typical reranking and embedding batches; the
# arena may still grow for longer ones, which long-context models take only when asked to.
WARMUP_MAX_LENGTH = 512
# The largest-batch warm-up is priced by one short sequence first; it decides alone (skip) only
# when the full-length sequence it stands for would take at least PRICE_PROBE_MIN_S (see
# ``_warm_largest_batch``).
PRICE_PROBE_LENGTH = 64
PRICE_PROBE_MIN_S = 0.5

Phase = Literal["starting", "ready", "draining", "stopped", "failed"]


def _run_delay_s() -> float | None:
    """Seconds this thread has spent runnable but waiting for a CPU (Linux schedstat), or None."""
    try:
        with open("/proc/thread-self/schedstat", encoding="ascii") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


def _timed_forward(model: InferenceModel, units: list[Unit]) -> float:
    """Seconds ``model.forward(units)`` took on this thread, less the time the thread waited for a
    CPU where the kernel says (else the wall time)."""
    d0, t0 = _run_delay_s(), time.perf_counter()
    model.forward(units)
    wall, d1 = time.perf_counter() - t0, _run_delay_s()
    return wall - (d1 - d0) if d0 is not None and d1 is not None else wall


class ServerState:
    def __init__(
        self,
        settings: Settings,
        models: Mapping[str, InferenceModel] | None = None,
        aliases: Mapping[str, str] | None = None,
    ) -> None:
        """``models``: already loaded models to serve under these names instead of loading
        ``settings.model`` (tests serve stand-in models this way, without any ONNX file);
        ``aliases``: further names of those models (``--model NAME,ALIAS=...`` gives them otherwise)."""
        self.settings = settings
        self._given = dict(models) if models is not None else None
        self.aliases: dict[str, str] = dict(aliases or {})
        self.registry = CollectorRegistry()
        self.http_metrics = HttpMetrics(self.registry, error_kinds())
        self.sched_metrics = SchedulerMetrics(self.registry)
        self.phase: Phase = "starting"
        self.models: dict[str, InferenceModel] = {}
        self.specs: dict[str, ModelSpec] = {}
        self.load_seconds: dict[str, float] = {}
        self.scheduler: Any = None
        self.inflight = 0
        # Every HTTP request's task (the service middleware keeps the set), and whether a
        # cancellation of one now means "the drain is over" (answered 503 shutting_down).
        self.http_tasks: set[asyncio.Task[Any]] = set()
        self.cutting_off = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._load_task: asyncio.Task[None] | None = None
        # Where the platform routes traffic only after the app's start-up (Ray Serve replicas), the
        # start-up waits for loading and warm-up, so no request meets a replica that is not ready.
        self.ready_before_startup_ends = False
        self.on_fatal: Callable[[], None] | None = None
        self.started_at = time.time()
        self.ready_after_s: float | None = None
        self.drain_deadline: float | None = None  # monotonic; the shutdown budget is shared by every step
        self.fault_injection = bool(getattr(settings, "fault_injection", False))
        self._trim = IdleTrim(settings.malloc_trim)
        self._trim_handle: asyncio.TimerHandle | None = None

    def resolve(self, name: str) -> str:
        """A model's name from one of its aliases (other names as they are)."""
        return self.aliases.get(name, name)

    # --- admission of inference work --------------------------------------------------------
    def require_scheduler(self) -> Any:
        if self.phase == "ready" and self.scheduler is not None:
            return self.scheduler
        if self.phase == "starting":
            raise NotReadyError("the server is still loading its models; retry shortly", retry_after=2.0)
        if self.phase == "failed":
            raise NotReadyError("the server failed to load its models", retry_after=5.0)
        raise ShuttingDownError("the server is shutting down; retry on another instance", retry_after=1.0)

    def enter(self) -> None:
        self.inflight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.inflight -= 1
        if self.inflight <= 0:
            self.inflight = 0
            self._idle.set()
            self._trim_when_idle()

    def _trim_when_idle(self) -> None:
        """Release runtimes' idle memory and give free heap back (``--malloc-trim``) once no request has been in flight for
        a moment; in a worker thread, not on the event loop."""
        if not self._trim.enabled or self._trim_handle is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not called from the event loop (a test driving the state by hand)
            return

        def fire() -> None:
            self._trim_handle = None
            if self.inflight == 0 and self.phase == "ready":
                loop.run_in_executor(None, self._trim)

        self._trim_handle = loop.call_later(self._trim.delay(), fire)

    # --- lifecycle ----------------------------------------------------------------------------
    def start_loading(self) -> None:
        self._load_task = asyncio.get_running_loop().create_task(self._load())

    async def wait_loaded(self) -> None:
        """Until loading and warm-up are over; raises if they failed."""
        if self._load_task is not None:
            await asyncio.shield(self._load_task)
        if self.phase == "failed":
            raise RuntimeError("encapure: models failed to load (see the log)")

    async def _load(self) -> None:
        from encapure.scheduler import Scheduler

        t0 = time.perf_counter()
        try:
            if self._given is not None:
                loaded = [(ModelSpec(name=n, source=m.manifest.source or n), m, 0.0) for n, m in self._given.items()]
            else:
                specs = parse_specs(self.settings)
                # Before any session exists: sessions, the worker pool and the warm-up share one count.
                self.settings = await asyncio.to_thread(sized_settings, self.settings, specs)
                loaded = [await asyncio.to_thread(load_spec, s, self.settings) for s in specs]
            for spec, model, seconds in loaded:
                self.models[spec.name] = model
                release = getattr(model, "release_memory", None)
                if callable(release):
                    self._trim.releasers.append(release)
                self.specs[spec.name] = spec
                self.load_seconds[spec.name] = seconds
                self.aliases.update(dict.fromkeys(spec.aliases, spec.name))
            self.scheduler = Scheduler(self.models, self.settings, self.sched_metrics)
            await self.scheduler.start()
            for name, model in self.models.items():
                w0 = time.perf_counter()
                await self._warm_up(name, model)
                self.load_seconds[name] += time.perf_counter() - w0
                self.sched_metrics.model_load_seconds.labels(model=name).set(self.load_seconds[name])
                log.info(
                    "model ready",
                    extra={
                        "model": name,
                        "task": model.task,
                        "precision": model.manifest.precision,
                        "source": self.specs[name].source,
                        "load_s": round(self.load_seconds[name], 3),
                    },
                )
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.phase = "failed"
            log.error("failed to load models: %s: %s", type(e).__name__, e, exc_info=e)
            if self.on_fatal is not None:
                self.on_fatal()
            return
        if self.phase == "starting":
            if self._trim.enabled:  # what loading and the warm-up freed, before RSS at ready is read
                await asyncio.to_thread(self._trim)
            self.phase = "ready"
            self.http_metrics.ready.set(1)
            self.ready_after_s = time.perf_counter() - t0
            log.info(
                "ready", extra={"models": ",".join(self.models), "startup_s": round(self.ready_after_s, 3)}
            )

    async def _warm_up(self, name: str, model: InferenceModel) -> None:
        """One real request through the whole pipeline, so the first client does not pay for it.

        It runs twice: the first pays one-time costs (OpenVINO repacks an IR's weights at the first
        inference), so the throughput it showed is forgotten, and the second seeds admission's first
        guess. Seeded by the first alone, a bge-reranker-v2-m3 int4 IR server refused every request as
        too large; with no seed at all, the first traffic's batches set the guess, and one slow batch
        made the next requests look like overload (503)."""
        sched = self.scheduler
        await self._warm_request(name, model)
        await self._warm_largest_batch(name, model)
        sched.forget_throughput()
        await self._warm_request(name, model)

    async def _warm_request(self, name: str, model: InferenceModel) -> None:
        sched = self.scheduler
        if model.task == "rerank":
            prepared = await sched.prepare(model.prepare_pairs, "warm up query", ["a warm up document"] * 4)
        else:
            prepared = await sched.prepare(model.prepare_texts, ["warm up text"] * 4)
        rows = await sched.submit(name, prepared, deadline=time.monotonic() + 300.0)
        model.finish(prepared, rows)

    async def _warm_largest_batch(self, name: str, model: InferenceModel) -> None:
        """The largest batch the scheduler forms (``max_batch_tokens`` in sequences of the model's
        max length, up to ``WARMUP_MAX_LENGTH``), on every worker at once, when one sequence of it
        prices the batch within ``warmup_budget_s``.

        ONNX Runtime's memory arena grows to the largest shapes it has run and keeps that memory:
        without this the RSS climbed for minutes as traffic met larger batches (+11.7% in one
        5-minute soak at 8 clients, flat once the arena had its bound), so a memory limit was met
        late and by surprise. The engine's forward is called directly: it is not a request, and
        the scheduler's throughput estimate must not start from it."""
        s = self.settings
        if s.warmup_budget_s <= 0:
            return
        length = min(model.max_length, WARMUP_MAX_LENGTH)
        n = max(1, min(s.max_batch_size, s.max_batch_tokens // length))
        pad = int(model.manifest.pad_token_id)
        # Priced without the time the thread waited for a CPU: what the batch costs this model, not
        # how busy the machine is right now. Priced by wall time, a server started beside other jobs
        # (2 shared cores, load average 9.5) said 4.4 s and skipped the warm-up, and its RSS then
        # climbed 84% under traffic instead of starting at the plateau.
        priced = 0.0
        if length > PRICE_PROBE_LENGTH:
            # A short sequence first, scaled linearly: that under-prices only attention's quadratic
            # part, so a price over the budget is over it for sure, once the full-length sequence
            # is long enough (PRICE_PROBE_MIN_S) for the per-call overhead not to count. Then the
            # batch is skipped without paying for a full-length sequence only to decide that
            # (bge-reranker-v2-m3, 512 tokens on 1 thread: 3.5 s of start-up).
            short = [Unit(ids=np.full(PRICE_PROBE_LENGTH, pad, dtype=np.int64))]
            one = await asyncio.to_thread(_timed_forward, model, short) * length / PRICE_PROBE_LENGTH
            priced = one * n if one >= PRICE_PROBE_MIN_S else 0.0
        if priced <= s.warmup_budget_s:
            full = [Unit(ids=np.full(length, pad, dtype=np.int64))]
            priced = await asyncio.to_thread(_timed_forward, model, full) * n
        if priced > s.warmup_budget_s:
            log.info(
                "largest-batch warm-up skipped: it would take about %.1f s (--warmup-budget %.1f s)",
                priced, s.warmup_budget_s, extra={"model": name, "batch": f"{n}x{length}"},
            )
            return
        units = [Unit(ids=np.full(length, pad, dtype=np.int64)) for _ in range(n)]
        await asyncio.gather(*(asyncio.to_thread(model.forward, units) for _ in range(s.workers)))

    def begin_drain(self) -> None:
        if self.phase in ("draining", "stopped"):
            return
        self.phase = "draining"
        self.drain_deadline = time.monotonic() + self.settings.shutdown_timeout_s
        self.http_metrics.ready.set(0)
        log.info(
            "draining: refusing new work, finishing in-flight requests", extra={"in_flight": self.inflight}
        )

    async def cut_off(self, grace_s: float = 1.0) -> int:
        """The drain's time is up: cancel every request still running; the service middleware
        answers each with JSON 503 ``shutting_down``. Waits up to ``grace_s`` for those answers to
        be written, and returns how many requests were cut off."""
        self.cutting_off = True
        current = asyncio.current_task()
        tasks = [t for t in self.http_tasks if t is not current and not t.done()]
        for t in tasks:
            t.cancel("encapure: shutdown timeout")
        if tasks:
            await asyncio.wait(tasks, timeout=grace_s)
        return len(tasks)

    async def wait_idle(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def close(self) -> None:
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        if self.scheduler is not None:
            budget = self.settings.shutdown_timeout_s
            if self.drain_deadline is not None:
                budget = max(0.5, self.drain_deadline - time.monotonic())
            await self.scheduler.shutdown(budget)
        self.phase = "stopped"
        self.http_metrics.ready.set(0)

"""Inference worker threads, and the one thing the scheduler needs from a model: ``forward``.

Why threads: ONNX Runtime releases the GIL inside ``run``, so a few threads keep the cores busy
while the event loop stays free. A worker touches nothing but the batch it was handed and reports
back with ``loop.call_soon_threadsafe``; the counts here are changed on the loop thread only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from encapure.engine.types import Unit
from encapure.scheduler.pending import Batch

log = logging.getLogger("encapure.scheduler")

# One row per unit: a float32 matrix, or a 1-D object array of per-unit arrays when the units asked
# for token-level rows (ColBERT, /embed_all), whose lengths differ.
Rows = npt.NDArray[np.float32]


@runtime_checkable
class Runner(Protocol):
    """Runs one batch: one raw row per unit. Thread-safe (several workers may call it at once).

    ``encapure.engine.OnnxModel`` is one; tests use a fixed-cost fake.
    """

    def forward(self, units: list[Unit]) -> Rows: ...


# (batch, rows or None, error or None), reported on the loop thread
OnDone = Callable[[Batch, "Rows | None", "BaseException | None"], None]
# (worker id, the batch it held or None, whether it exited cleanly), reported on the loop thread
OnExit = Callable[[int, "Batch | None", bool], None]


class WorkerPool:
    """``n`` daemon threads taking batches from one queue; liveness and idle counts."""

    def __init__(self, runners: Mapping[str, Runner], n: int, on_done: OnDone, on_exit: OnExit) -> None:
        self.runners = runners
        self.threads = [
            threading.Thread(target=self._main, args=(wid,), name=f"encapure-worker-{wid}", daemon=True)
            for wid in range(n)
        ]
        self.alive = 0
        self.idle = 0
        self._on_done = on_done
        self._on_exit = on_exit
        self._jobs: queue.SimpleQueue[Batch | None] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def inflight(self) -> int:
        """Batches handed to a worker and not reported back yet."""
        return self.alive - self.idle

    def healthy(self) -> bool:
        return self.alive == len(self.threads) and all(t.is_alive() for t in self.threads)

    # --- loop thread --------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.alive = self.idle = len(self.threads)
        for t in self.threads:
            t.start()

    def dispatch(self, batch: Batch) -> None:
        self.idle -= 1
        self._jobs.put(batch)

    def stop(self) -> None:
        """Ask every worker to exit after its current batch (any thread)."""
        for _ in self.threads:
            self._jobs.put(None)

    async def join(self, until: float) -> None:
        for t in self.threads:
            # a worker stuck inside a forward pass cannot be interrupted; it is a daemon thread
            await asyncio.to_thread(t.join, max(0.05, until - time.monotonic()))

    def _done(self, batch: Batch, rows: Rows | None, error: BaseException | None) -> None:
        self.idle += 1
        self._on_done(batch, rows, error)

    def _exited(self, wid: int, batch: Batch | None, clean: bool) -> None:
        self.alive -= 1
        if batch is None:
            self.idle -= 1
        self._on_exit(wid, batch, clean)

    # --- worker threads -----------------------------------------------------------------------
    def _post(self, fn: Callable[..., Any], *args: Any) -> None:
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
            loop.call_soon_threadsafe(fn, *args)

    def _main(self, wid: int) -> None:
        current: Batch | None = None
        clean = False
        try:
            while True:
                batch = self._jobs.get()
                if batch is None:
                    clean = True
                    return
                current = batch
                self._run(batch)
                current = None
        except BaseException as e:  # the thread itself dies: report it, never hang a request
            log.error("inference worker %d died: %s: %s", wid, type(e).__name__, e)
        finally:
            self._post(self._exited, wid, current, clean)

    def _run(self, batch: Batch) -> None:
        error: Exception | None = None
        rows: Rows | None = None
        try:
            runner = self.runners[batch.model]
            items = [it for it in batch.items if not it.req.done]
            batch.ran = items
            if items:
                batch.started = time.monotonic()
                t = time.perf_counter()
                out = runner.forward([it.unit for it in items])
                batch.elapsed = time.perf_counter() - t
                if isinstance(out, np.ndarray) and out.dtype == object:  # token-level rows, ragged
                    rows = out
                else:
                    rows = np.asarray(out, dtype=np.float32).reshape(len(items), -1)
        except Exception as e:  # the batch fails, the worker lives on
            error = e
        self._post(self._done, batch, rows, error)

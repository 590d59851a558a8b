"""Result routing: a finished batch's rows go back to the requests they belong to.

Why apart from the facade: this is where per-batch metrics are observed and where a request is
answered once its last unit is back; it needs nothing but the batch and a way to finish requests.
Runs on the event loop thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from encapure.errors import ModelError
from encapure.scheduler.metrics import SchedulerMetrics
from encapure.scheduler.pending import Batch
from encapure.scheduler.workers import Rows

log = logging.getLogger("encapure.scheduler")


@dataclass
class Totals:
    """Counters since start, for ``Scheduler.stats()``."""

    batches: int = 0
    units: int = 0  # units computed
    cross_request_batches: int = 0  # batches that held units of more than one request
    discarded: int = 0  # units computed for a request that had already ended


def settle(
    batch: Batch,
    rows: Rows | None,
    error: BaseException | None,
    metrics: SchedulerMetrics,
    totals: Totals,
    finish: Callable[..., Any],
) -> int:
    """Observe the batch, fail its requests or hand them their rows; returns the units computed.

    ``finish(req, error=..., reason=..., result=...)`` is the scheduler's one exit of a request.
    """
    ran = batch.ran
    if len(ran) < len(batch.items):
        kept = {id(it) for it in ran}
        for it in batch.items:
            if id(it) not in kept:  # its request ended while the unit waited for the worker
                metrics.dropped_items.labels(reason=it.req.drop_reason).inc()
    reqs = {id(it.req): it.req for it in ran}
    m, model = metrics, batch.model
    if ran:
        m.batches.labels(model=model).inc()
        m.batch_size.labels(model=model).observe(len(ran))
        m.batch_tokens.labels(model=model).observe(len(ran) * max(it.length for it in ran))
        m.batch_requests.labels(model=model).observe(len(reqs))
        m.inference_seconds.labels(model=model).observe(batch.elapsed)
        totals.batches += 1
        if len(reqs) > 1:
            totals.cross_request_batches += 1
    if error is not None:
        m.failed_batches.labels(model=model).inc()
        log.error(
            "batch of %d units (%d requests) failed on model %s: %s",
            len(ran),
            len(reqs),
            model,
            error,
            exc_info=error,
        )
        msg = error.message if isinstance(error, ModelError) else f"{type(error).__name__}: {error}"
        for req in reqs.values():
            finish(req, error=ModelError(f"inference failed: {msg}"), reason="error")
        return 0
    if rows is None:
        return 0
    totals.units += len(ran)
    for k, it in enumerate(ran):
        req = it.req
        if req.done:
            metrics.discarded_units.inc()
            totals.discarded += 1
            continue
        if req.rows is None:
            ragged = rows.dtype == object
            req.rows = (np.empty(req.n_units, dtype=object) if ragged
                        else np.empty((req.n_units, rows.shape[1]), dtype=np.float32))
        req.rows[it.index] = rows[k]
        req.remaining -= 1
    for req in reqs.values():
        req.batches += 1
        req.forward_s += batch.elapsed
        req.first_start = min(req.first_start, batch.started)
        req.last_start = max(req.last_start, batch.started)
        if not req.done and req.remaining == 0:
            assert req.rows is not None
            finish(req, error=None, reason="ok", result=req.rows)
    return len(ran)

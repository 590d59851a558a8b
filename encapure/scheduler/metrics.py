"""Prometheus metrics of the scheduler.

They live on a ``CollectorRegistry`` given by the caller so that the HTTP layer can expose the
scheduler's metrics next to its own on one ``/metrics`` page, and so that tests can build as many
schedulers as they like without clashing on the global default registry.

Names (all prefixed ``encapure_``; the HTTP layer should not reuse them):

- ``encapure_queue_depth_items{model}``            gauge: units waiting for a batch
- ``encapure_requests_in_scheduler``               gauge: admitted requests not yet answered
- ``encapure_inflight_batches``                    gauge: batches handed to workers, not finished
- ``encapure_batch_size{model}``                   histogram: units per realized batch
- ``encapure_batch_tokens{model}``                 histogram: padded tokens per batch (size x longest)
- ``encapure_batch_requests{model}``               histogram: distinct requests per batch (cross-request batching)
- ``encapure_queue_seconds{model}``                histogram: per request, admission -> its last unit starts running
- ``encapure_inference_seconds{model}``            histogram: per batch, wall time of ``model.forward``
- ``encapure_batches_total{model}``                counter: batches run (failed ones included)
- ``encapure_failed_batches_total{model}``         counter: batches whose ``forward`` raised
- ``encapure_dropped_items_total{reason}``         counter: units never computed (deadline, cancelled, shutdown, worker_died, error)
- ``encapure_rejected_requests_total{reason}``     counter: requests refused at admission (overloaded, shutting_down, worker_died, too_large)
- ``encapure_discarded_units_total``               counter: units computed for a request that had already ended (wasted work)
- ``encapure_admitted_work_seconds``               gauge: admitted work not yet computed, in seconds at the measured throughput
- ``encapure_throughput_work_per_second``          gauge: the measured throughput admission counts with (tokens + per-unit overhead)

Every labelled counter starts with a zero series for each of its reasons, so an alert on its rate
works before the first event.
- ``encapure_workers_alive``                       gauge: live inference worker threads
- ``encapure_model_load_seconds{model}``           gauge: load + warm-up time, set by whoever loads the model
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

DROP_REASONS = ("deadline", "cancelled", "shutdown", "worker_died", "error")
REJECT_REASONS = ("overloaded", "shutting_down", "worker_died", "too_large")
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_TOKEN_BUCKETS = (16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
_REQ_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64)
_TIME_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class SchedulerMetrics:
    """The scheduler's metrics on one registry (a fresh one when none is given)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge(
            "encapure_queue_depth_items", "Units waiting to be batched", ["model"], registry=r
        )
        self.requests_in_scheduler = Gauge(
            "encapure_requests_in_scheduler", "Admitted requests not yet answered", registry=r
        )
        self.inflight_batches = Gauge(
            "encapure_inflight_batches", "Batches handed to inference workers and not finished", registry=r
        )
        self.batch_size = Histogram(
            "encapure_batch_size", "Units per realized batch", ["model"], buckets=_SIZE_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            "encapure_batch_tokens",
            "Padded tokens per realized batch (batch size x longest unit)",
            ["model"],
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.batch_requests = Histogram(
            "encapure_batch_requests",
            "Distinct requests whose units share one batch",
            ["model"],
            buckets=_REQ_BUCKETS,
            registry=r,
        )
        self.queue_seconds = Histogram(
            "encapure_queue_seconds",
            "Per request: time from admission until its last unit started running",
            ["model"],
            buckets=_TIME_BUCKETS,
            registry=r,
        )
        self.inference_seconds = Histogram(
            "encapure_inference_seconds",
            "Per batch: wall time of the model forward pass",
            ["model"],
            buckets=_TIME_BUCKETS,
            registry=r,
        )
        self.batches = Counter("encapure_batches", "Batches run", ["model"], registry=r)
        self.failed_batches = Counter(
            "encapure_failed_batches", "Batches whose forward pass raised", ["model"], registry=r
        )
        self.dropped_items = Counter(
            "encapure_dropped_items", "Units dropped without being computed", ["reason"], registry=r
        )
        self.rejected_requests = Counter(
            "encapure_rejected_requests", "Requests refused at admission", ["reason"], registry=r
        )
        self.discarded_units = Counter(
            "encapure_discarded_units",
            "Units computed for a request that had already ended (deadline, disconnect): wasted work",
            registry=r,
        )
        self.admitted_work_seconds = Gauge(
            "encapure_admitted_work_seconds",
            "Admitted work not yet computed, in seconds at the measured throughput",
            registry=r,
        )
        self.throughput = Gauge(
            "encapure_throughput_work_per_second",
            "Measured throughput admission counts with (tokens plus a per-unit overhead, per second)",
            registry=r,
        )
        for reason in DROP_REASONS:
            self.dropped_items.labels(reason=reason)
        for reason in REJECT_REASONS:
            self.rejected_requests.labels(reason=reason)
        self.workers_alive = Gauge("encapure_workers_alive", "Live inference worker threads", registry=r)
        self.model_load_seconds = Gauge(
            "encapure_model_load_seconds", "Model load and warm-up time", ["model"], registry=r
        )

    def observe_model_load(self, model: str, seconds: float) -> None:
        """Record how long a model took to load and warm up (the loader knows, not the scheduler)."""
        self.model_load_seconds.labels(model=model).set(seconds)

"""Cross-request dynamic batching, bounded admission and deadlines. Knows nothing of HTTP.

``Scheduler`` (with ``SchedulerMetrics``) is what the server builds on; it needs of a model only
a ``Runner`` (``forward(units) -> rows``). ``AsyncReranker``, ``AsyncEmbedder`` and
``AsyncClassifier`` give Python users the same batching in-process. The parts are described in
``docs/scheduler.md``.
"""

from encapure.scheduler.asyncapi import AsyncClassifier, AsyncEmbedder, AsyncReranker
from encapure.scheduler.core import Phase, Scheduler
from encapure.scheduler.metrics import SchedulerMetrics
from encapure.scheduler.workers import Runner

__all__ = [
    "AsyncClassifier",
    "AsyncEmbedder",
    "AsyncReranker",
    "Phase",
    "Runner",
    "Scheduler",
    "SchedulerMetrics",
]

"""Cross-request dynamic batching, bounded admission and deadlines. Knows nothing of HTTP.

``Scheduler`` and ``SchedulerMetrics`` are what the server builds on; ``AsyncReranker``,
``AsyncEmbedder`` and ``AsyncClassifier`` give Python users the same batching in-process.
"""

from encapure.scheduler.asyncapi import AsyncClassifier, AsyncEmbedder, AsyncReranker
from encapure.scheduler.core import Scheduler
from encapure.scheduler.metrics import SchedulerMetrics

__all__ = ["AsyncClassifier", "AsyncEmbedder", "AsyncReranker", "Scheduler", "SchedulerMetrics"]

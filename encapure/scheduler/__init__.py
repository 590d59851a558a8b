"""Cross-request dynamic batching, bounded admission and deadlines. Knows nothing of HTTP."""

from encapure.scheduler.core import Scheduler
from encapure.scheduler.metrics import SchedulerMetrics

__all__ = ["Scheduler", "SchedulerMetrics"]

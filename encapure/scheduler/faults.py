"""Fault injection for tests: slow, failing and dying batches, without touching production code.

With ``Settings.fault_injection`` the scheduler wraps each model's runner in ``FaultyRunner``; a
request opts in with ``mark(prepared, fault)`` (the server does it for the ``x-encapure-fault``
header). A marked request's units carry the fault, and the wrapper acts on the batch that holds
them. Without the setting there is no wrapper and a mark changes nothing. Faults:

- ``slow:<ms>``: sleep that long before running the batch (keeps a worker busy);
- ``fail_batch``: the batch raises ``ModelError``;
- ``kill_worker``: the worker thread dies (an exception no ``except Exception`` catches).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from encapure.engine.types import Prepared, Unit
from encapure.errors import ModelError
from encapure.scheduler.workers import Rows, Runner


class WorkerKilled(BaseException):
    """Simulated crash: escapes every ``except Exception`` like a real one would."""


@dataclass(slots=True)
class FaultyUnit(Unit):
    """A unit of a request that asked for a fault; the model sees a plain ``Unit``."""

    fault: str = ""


def mark(prepared: Prepared, fault: str) -> Prepared:
    """Attach ``fault`` to every unit of ``prepared`` (in place; returned for chaining)."""
    prepared.units = [FaultyUnit(u.ids, u.type_ids, u.attention, u.token_level, fault=fault) for u in prepared.units]
    return prepared


class FaultyRunner:
    """Wraps a runner: acts on the faults its batch carries, then runs the batch as usual."""

    def __init__(self, inner: Runner) -> None:
        self.inner = inner

    def forward(self, units: list[Unit]) -> Rows:
        faults = {u.fault for u in units if isinstance(u, FaultyUnit) and u.fault}
        for f in sorted(faults):
            if f.startswith("slow:"):
                try:
                    ms = float(f.split(":", 1)[1])
                except ValueError:
                    ms = 0.0
                time.sleep(max(0.0, ms) / 1000.0)
        if "kill_worker" in faults:
            raise WorkerKilled("fault injection: kill_worker")
        if "fail_batch" in faults:
            raise ModelError("fault injection: fail_batch")
        return self.inner.forward(units)

"""The scheduler end to end: cross-request batching, admission, deadlines, cancellation, failing
batches, dying workers and shutdown.

The model is the engine's real ``OnnxModel`` (real tokenizer, padding, folding) over a fake ONNX
Runtime session with a fixed cost per batch and rows that depend only on their own tokens
(``tests/fakes.py``), so a row routed to the wrong request shows, and no export or torch is
needed. Each test runs its own event loop (``asyncio.run``) and its own ``Scheduler``;
timing-dependent behaviour is forced with fault injection (``slow:<ms>`` keeps a worker busy)
rather than hoped for, and every test asserts that no request is left pending. The batching
rules themselves are unit-tested without threads in ``test_scheduler_policy.py``.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import numpy as np
import pytest
from fakes import fake_model, fake_session

from encapure.engine.types import Prepared
from encapure.errors import (
    CancelledRequestError,
    DeadlineExceededError,
    ModelError,
    ModelNotFoundError,
    OverloadedError,
    ShuttingDownError,
    WorkerDiedError,
)
from encapure.scheduler import Scheduler, SchedulerMetrics, faults
from encapure.scheduler.pending import InProgress
from encapure.settings import Settings

pytestmark = pytest.mark.timeout(60)

# What one batch costs on the fake model: enough for requests to overlap, little enough to be quick.
BATCH_S = 0.002

T = TypeVar("T")

_WORD_TEXT = (
    "the of and to in is was for on that with as by it at from his an were are which this be or "
    "has had first one their its new after who they have her she two been other when there all "
    "during into school time may years more most only over city some world would where later up "
    "such used many can state about national out known university united then made river"
)
WORDS = _WORD_TEXT.split()


def text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words)).capitalize() + "."


def make_request(rng: random.Random, n_docs: int, short: bool = False) -> tuple[str, list[str]]:
    query = text(rng, rng.randint(3, 10))
    hi = 12 if short else rng.choice([4, 12, 30])
    return query, [text(rng, rng.randint(2, hi)) for _ in range(n_docs)]


@pytest.fixture(scope="module")
def model() -> Any:
    return fake_model("rerank", name="rr", settings=Settings(threads_per_worker=1), base_s=BATCH_S)


def settings(**kw: Any) -> Settings:
    base: dict[str, Any] = {"workers": 1, "fault_injection": True, "max_wait_ms": 2.0}
    base.update(kw)
    return Settings(**base)


async def started(model: Any, s: Settings, metrics: SchedulerMetrics | None = None) -> Scheduler:
    sched = Scheduler({"rr": model}, s, metrics)
    await sched.start()
    return sched


def prep(model: Any, n_docs: int, seed: int = 0, fault: str | None = None, short: bool = True) -> Prepared:
    q, docs = make_request(random.Random(seed), n_docs, short=short)
    p = model.prepare_pairs(q, docs)
    if fault:
        faults.mark(p, fault)
    return p


def metric(m: SchedulerMetrics, name: str, **labels: str) -> float:
    v = m.registry.get_sample_value(name, labels)
    return 0.0 if v is None else float(v)


def run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(coro_fn())  # type: ignore[arg-type]


def assert_settled(sched: Scheduler) -> None:
    st = sched.stats()
    assert st["active_requests"] == 0, st
    assert st["queued_items"] == 0, st
    assert st["items_in_system"] == 0, st
    assert st["waiting_admission"] == 0, st


# --------------------------------------------------------------------------------------- batching
@pytest.mark.parametrize("workers", [1, 2])
def test_concurrent_requests_equal_engine_alone_and_share_batches(model: Any, workers: int) -> None:
    """100 concurrent requests of different sizes: each gets exactly what the engine gives it alone,
    and the scheduler really pooled units of several requests into shared batches."""
    rng = random.Random(7)
    requests = [make_request(rng, rng.choice([1, 2, 3, 4, 6])) for _ in range(100)]
    expected = [model(model.prepare_pairs(q, d)).scores for q, d in requests]
    metrics = SchedulerMetrics()

    async def main() -> tuple[list[np.ndarray], dict[str, Any]]:
        sched = await started(model, settings(workers=workers, max_batch_size=32), metrics)

        async def one(q: str, docs: list[str]) -> np.ndarray:
            p = await sched.prepare(model.prepare_pairs, q, docs)
            rows = await sched.submit("rr", p)
            return model.finish(p, rows).scores

        out = await asyncio.gather(*(one(q, d) for q, d in requests))
        st = sched.stats()
        assert_settled(sched)
        assert metric(metrics, "encapure_workers_alive") == workers
        await sched.shutdown(5)
        return out, st

    got, st = run(main)
    for (_, docs), g, e in zip(requests, got, expected, strict=True):
        assert g.shape == (len(docs),)
        np.testing.assert_allclose(g, e, atol=2e-5, rtol=0)
    total_units = sum(len(d) for _, d in requests)
    assert st["units_computed"] == total_units
    # batches held units of several requests: fewer batches than requests, several cross-request
    n_batches = metric(metrics, "encapure_batch_size_count", model="rr")
    assert n_batches == st["batches"] < 100
    assert st["cross_request_batches"] >= 3
    assert metric(metrics, "encapure_batch_requests_count", model="rr") == n_batches
    assert metric(metrics, "encapure_batch_requests_sum", model="rr") > n_batches
    assert metric(metrics, "encapure_batch_size_sum", model="rr") == total_units
    assert metric(metrics, "encapure_queue_depth_items", model="rr") == 0


def test_batches_respect_token_budget_and_size(model: Any) -> None:
    s = settings(max_batch_size=8, max_batch_tokens=600)
    metrics = SchedulerMetrics()
    rng = random.Random(3)
    requests = [make_request(rng, rng.randint(1, 12)) for _ in range(30)]

    ran = fake_session(model).batches
    before = len(ran)

    async def main() -> None:
        sched = await started(model, s, metrics)
        preps = [model.prepare_pairs(q, d) for q, d in requests]
        outs = await asyncio.gather(*(sched.submit("rr", p) for p in preps))
        for p, o in zip(preps, outs, strict=True):
            assert o.shape == (len(p.units), 1)
        await sched.shutdown(5)

    run(main)
    shapes = ran[before:]  # (rows, padded width) of every batch the model really ran
    assert sum(n for n, _ in shapes) == sum(len(d) for _, d in requests)
    assert all(n <= 8 and (n * width <= 600 or n == 1) for n, width in shapes), shapes
    # every realized batch fits the budget unless one unit alone is longer (max_length 256 < 600)
    assert metric(metrics, "encapure_batch_size_bucket", model="rr", le="8.0") == metric(
        metrics, "encapure_batch_size_count", model="rr"
    )
    assert metric(metrics, "encapure_batch_tokens_bucket", model="rr", le="1024.0") == metric(
        metrics, "encapure_batch_tokens_count", model="rr"
    )
    assert metric(metrics, "encapure_batch_size_bucket", model="rr", le="4.0") < metric(
        metrics, "encapure_batch_size_count", model="rr"
    )


def test_lone_request_is_not_delayed_by_max_wait(model: Any) -> None:
    """With nothing else on its way, a request goes out at once however long max_wait is."""
    p = prep(model, 2)

    async def main() -> float:
        sched = await started(model, settings(max_wait_ms=3000))
        await sched.submit("rr", p)  # warm
        t = time.monotonic()
        for _ in range(3):
            await sched.submit("rr", p)
        dt = (time.monotonic() - t) / 3
        await sched.shutdown(5)
        return dt

    assert run(main) < 1.0  # would be >= 3 s if the window were waited out


def test_lone_request_is_shared_by_idle_workers(model: Any) -> None:
    """Nothing else to do: a lone request's batch is cut into parts for the idle workers."""
    metrics = SchedulerMetrics()
    p = prep(model, 16, seed=4)
    expected = model(p).scores

    async def main() -> np.ndarray:
        sched = await started(model, settings(workers=2), metrics)
        rows = await sched.submit("rr", p)
        await sched.shutdown(5)
        return rows

    rows = run(main)
    np.testing.assert_allclose(model.finish(p, rows).scores, expected, atol=2e-5)
    assert metric(metrics, "encapure_batch_size_count", model="rr") == 2
    assert metric(metrics, "encapure_batch_size_sum", model="rr") == 16


@pytest.mark.parametrize("max_wait_ms", [0.0, 2000.0])
def test_partial_batch_waits_for_requests_being_prepared(model: Any, max_wait_ms: float) -> None:
    """A partial batch waits (up to max_wait) for a request still being tokenized, so both share
    one batch; with max_wait 0 it leaves alone."""
    metrics = SchedulerMetrics()
    pa, pb = prep(model, 2, seed=1), prep(model, 3, seed=2)

    def slow_prepare() -> Prepared:
        time.sleep(0.3)
        return pb

    async def main() -> None:
        sched = await started(model, settings(max_wait_ms=max_wait_ms), metrics)

        async def b() -> np.ndarray:
            p = await sched.prepare(slow_prepare)
            return await sched.submit("rr", p)

        task_b = asyncio.create_task(b())
        await asyncio.sleep(0.05)  # b is now being prepared
        ra, rb = await asyncio.gather(sched.submit("rr", pa), task_b)
        assert ra.shape == (2, 1) and rb.shape == (3, 1)
        await sched.shutdown(5)

    run(main)
    shared = metric(metrics, "encapure_batch_requests_bucket", model="rr", le="1.0")
    batches = metric(metrics, "encapure_batch_requests_count", model="rr")
    if max_wait_ms > 0:
        assert batches == 1 and shared == 0  # one batch holding both requests
    else:
        assert batches == 2 and shared == 2


def test_prepare_runs_off_the_event_loop(model: Any) -> None:
    async def main() -> None:
        sched = await started(model, settings())
        loop_thread = threading.get_ident()
        where = await sched.prepare(threading.get_ident)
        assert where != loop_thread
        # the loop keeps ticking while a slow prepare runs
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        t = asyncio.create_task(ticker())
        await sched.prepare(time.sleep, 0.3)
        t.cancel()
        assert ticks >= 5
        await sched.shutdown(5)

    run(main)


# --------------------------------------------------------------------------------------- admission
def test_admission_timeout_gives_overloaded_quickly_then_recovers(model: Any) -> None:
    metrics = SchedulerMetrics()
    s = settings(max_concurrent_requests=2, admission_timeout_s=0.2)

    async def main() -> None:
        sched = await started(model, s, metrics)
        busy = [asyncio.create_task(sched.submit("rr", prep(model, 1, fault="slow:1000"))) for _ in range(2)]
        await asyncio.sleep(0.05)
        t = time.monotonic()
        results = await asyncio.gather(
            *(sched.submit("rr", prep(model, 2)) for _ in range(5)), return_exceptions=True
        )
        waited = time.monotonic() - t
        assert all(isinstance(r, OverloadedError) for r in results), results
        assert all(r.retry_after is not None and r.retry_after >= 1 for r in results)  # type: ignore[union-attr]
        assert waited < 0.8  # the admission timeout (0.2 s), not the 1 s a busy request takes
        for b in busy:
            assert (await b).shape == (1, 1)
        # capacity is back: served normally afterwards
        assert (await sched.submit("rr", prep(model, 3))).shape == (3, 1)
        assert_settled(sched)
        await sched.shutdown(5)

    run(main)
    assert metric(metrics, "encapure_rejected_requests_total", reason="overloaded") == 5


def test_queued_item_limit_and_waiter_admitted_when_room_frees(model: Any) -> None:
    s = settings(max_queued_items=6, admission_timeout_s=3.0)

    async def main() -> None:
        sched = await started(model, s)
        first = asyncio.create_task(sched.submit("rr", prep(model, 5, fault="slow:400")))
        await asyncio.sleep(0.05)
        t = time.monotonic()
        second = await sched.submit("rr", prep(model, 4))  # 5 + 4 > 6: waits for the first
        assert time.monotonic() - t > 0.2
        assert (await first).shape == (5, 1) and second.shape == (4, 1)
        # a request larger than the whole queue still runs (alone) instead of never
        assert (await sched.submit("rr", prep(model, 9))).shape == (9, 1)
        assert_settled(sched)
        await sched.shutdown(5)

    run(main)


# ---------------------------------------------------------------------------------------- deadlines
def test_deadline_expiry_drops_queued_work(model: Any) -> None:
    metrics = SchedulerMetrics()

    async def main() -> None:
        sched = await started(model, settings(), metrics)
        blocker = asyncio.create_task(sched.submit("rr", prep(model, 1, fault="slow:800")))
        await asyncio.sleep(0.05)
        t = time.monotonic()
        with pytest.raises(DeadlineExceededError):
            await sched.submit("rr", prep(model, 4, seed=5), deadline=time.monotonic() + 0.2)
        assert time.monotonic() - t < 0.6  # answered at its deadline, not when the worker frees up
        assert (await blocker).shape == (1, 1)
        # default deadline = request_timeout_s; an already-past deadline is refused at once
        with pytest.raises(DeadlineExceededError):
            await sched.submit("rr", prep(model, 1), deadline=time.monotonic() - 1)
        assert sched.stats()["units_computed"] == 1  # the expired units were never computed
        assert_settled(sched)
        await sched.shutdown(5)

    run(main)
    assert metric(metrics, "encapure_dropped_items_total", reason="deadline") == 5


def test_request_timeout_setting_is_the_default_deadline(model: Any) -> None:
    async def main() -> None:
        sched = await started(model, settings(request_timeout_s=0.3))
        t = time.monotonic()
        with pytest.raises(DeadlineExceededError):
            await sched.submit("rr", prep(model, 1, fault="slow:1000"))  # in flight when it expires
        assert time.monotonic() - t < 0.8  # its deadline (0.3 s), not the end of its batch (1 s)
        assert_settled(sched)
        await sched.shutdown(5)

    run(main)


# ------------------------------------------------------------------------------------- cancellation
def test_cancelled_work_is_dropped_not_computed(model: Any) -> None:
    metrics = SchedulerMetrics()

    async def main() -> None:
        sched = await started(model, settings(), metrics)
        blocker = asyncio.create_task(sched.submit("rr", prep(model, 1, fault="slow:700")))
        await asyncio.sleep(0.05)
        gone = threading.Event()
        # 1) the client-went-away callback
        polled = asyncio.create_task(sched.submit("rr", prep(model, 3, seed=1), is_cancelled=gone.is_set))
        # 2) the awaiting task itself is cancelled (what an HTTP framework does on disconnect)
        task = asyncio.create_task(sched.submit("rr", prep(model, 4, seed=2)))
        await asyncio.sleep(0.1)
        gone.set()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        with pytest.raises(CancelledRequestError):
            await polled
        assert (await blocker).shape == (1, 1)
        assert sched.stats()["units_computed"] == 1
        assert (await sched.submit("rr", prep(model, 2))).shape == (2, 1)
        assert_settled(sched)
        await sched.shutdown(5)

    run(main)
    assert metric(metrics, "encapure_dropped_items_total", reason="cancelled") == 7


# ----------------------------------------------------------------------------------------- failures
def test_failing_batch_fails_only_its_requests_and_worker_lives_on(model: Any) -> None:
    metrics = SchedulerMetrics()
    rng = random.Random(11)
    others = [make_request(rng, 3) for _ in range(12)]

    async def main() -> None:
        sched = await started(model, settings(max_batch_size=4), metrics)
        with pytest.raises(ModelError, match="fail_batch"):
            await sched.submit("rr", prep(model, 2, fault="fail_batch"))
        assert sched.is_healthy()
        # concurrently: the failing request and others; only requests sharing its batch fail
        preps = [model.prepare_pairs(q, d) for q, d in others]
        bad = prep(model, 2, seed=9, fault="fail_batch")
        res = await asyncio.gather(
            sched.submit("rr", bad), *(sched.submit("rr", p) for p in preps), return_exceptions=True
        )
        assert isinstance(res[0], ModelError)
        ok = [r for r in res[1:] if not isinstance(r, BaseException)]
        failed = [r for r in res[1:] if isinstance(r, BaseException)]
        assert all(isinstance(f, ModelError) for f in failed)
        assert len(failed) <= 3  # at most the rest of its batch (max 4 units, 2 of them its own)
        assert len(ok) >= 9
        for p, r in zip(preps, res[1:], strict=True):
            if not isinstance(r, BaseException):
                np.testing.assert_allclose(model.finish(p, r).scores, model(p).scores, atol=2e-5)
        assert sched.is_healthy()
        assert metric(metrics, "encapure_workers_alive") == 1
        assert_settled(sched)
        await sched.shutdown(5)

    run(main)
    assert metric(metrics, "encapure_failed_batches_total", model="rr") == 2


def test_killed_worker_turns_unhealthy_and_leaves_nothing_pending(model: Any) -> None:
    metrics = SchedulerMetrics()

    async def main() -> None:
        sched = await started(model, settings(workers=2), metrics)
        assert sched.is_healthy()
        with pytest.raises(WorkerDiedError):
            # one unit: a lone request's batch is shared among idle workers, so 2 units would kill both
            await sched.submit("rr", prep(model, 1, fault="kill_worker"))
        assert not sched.is_healthy()
        assert sched.is_accepting()  # the other worker still serves
        assert (await sched.submit("rr", prep(model, 3))).shape == (3, 1)
        # kill the last one while others wait behind it: every one of them is answered
        doomed = asyncio.create_task(sched.submit("rr", prep(model, 1, fault="kill_worker")))
        await asyncio.sleep(0)
        waiting = [asyncio.create_task(sched.submit("rr", prep(model, 2, seed=i))) for i in range(5)]
        done, pending = await asyncio.wait([doomed, *waiting], timeout=10)
        assert not pending
        for t in done:
            assert isinstance(t.exception(), WorkerDiedError), t
        assert not sched.is_accepting()
        with pytest.raises(WorkerDiedError):
            await sched.submit("rr", prep(model, 1))
        assert_settled(sched)
        await sched.shutdown(1)

    run(main)
    assert metric(metrics, "encapure_workers_alive") == 0


# ----------------------------------------------------------------------------------------- shutdown
def test_shutdown_drains_admitted_work_and_refuses_new(model: Any) -> None:
    async def main() -> None:
        sched = await started(model, settings())
        tasks = [asyncio.create_task(sched.submit("rr", prep(model, 2, fault="slow:300")))]
        tasks += [asyncio.create_task(sched.submit("rr", prep(model, 3, seed=i))) for i in range(4)]
        await asyncio.sleep(0.05)
        stop = asyncio.create_task(sched.shutdown(10))
        await asyncio.sleep(0)
        assert not sched.is_accepting()
        with pytest.raises(ShuttingDownError):
            await sched.submit("rr", prep(model, 1))
        with pytest.raises(ShuttingDownError):
            await sched.prepare(time.sleep, 0)
        results = await asyncio.gather(*tasks)
        assert [r.shape[0] for r in results] == [2, 3, 3, 3, 3]
        await stop
        assert not sched.is_healthy()

    run(main)


def test_shutdown_carries_requests_being_prepared_or_waiting_for_admission(model: Any) -> None:
    """SIGTERM must not lose a request the server already took: one still tokenizing and one
    waiting for capacity when the drain starts both finish normally."""
    s = settings(max_concurrent_requests=1, admission_timeout_s=5.0)

    def slow_prepare() -> Prepared:
        time.sleep(0.3)
        return prep(model, 2, seed=3)

    async def main() -> None:
        sched = await started(model, s)
        holder = asyncio.create_task(sched.submit("rr", prep(model, 1, fault="slow:300")))
        waiter = asyncio.create_task(sched.submit("rr", prep(model, 2, seed=1)))  # no room yet

        async def preparing() -> np.ndarray:
            p = await sched.prepare(slow_prepare)
            return await sched.submit("rr", p)

        tokenizing = asyncio.create_task(preparing())
        await asyncio.sleep(0.05)
        await sched.shutdown(10)
        assert (await holder).shape == (1, 1)
        assert (await waiter).shape == (2, 1)
        assert (await tokenizing).shape == (2, 1)

    run(main)


def test_shutdown_timeout_fails_the_rest(model: Any) -> None:
    metrics = SchedulerMetrics()

    async def main() -> None:
        sched = await started(model, settings(), metrics)
        stuck = asyncio.create_task(sched.submit("rr", prep(model, 1, fault="slow:2000")))
        queued = asyncio.create_task(sched.submit("rr", prep(model, 3)))
        await asyncio.sleep(0.05)
        t = time.monotonic()
        await sched.shutdown(0.3)
        assert time.monotonic() - t < 1.5
        for task in (stuck, queued):
            with pytest.raises(ShuttingDownError):
                await task

    run(main)
    assert metric(metrics, "encapure_dropped_items_total", reason="shutdown") == 3


def test_internal_error_in_the_batcher_fails_requests_instead_of_hanging(
    model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = InProgress.live_items
    calls = {"n": 0}

    def broken(self: InProgress, *a: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("batcher bug")
        return real(self, *a)

    monkeypatch.setattr(InProgress, "live_items", broken)

    async def main() -> None:
        sched = await started(model, settings())
        with pytest.raises(ModelError, match="internal scheduler error"):
            await asyncio.wait_for(sched.submit("rr", prep(model, 2)), 10)
        assert (await sched.submit("rr", prep(model, 2))).shape == (2, 1)  # and it lives on
        assert_settled(sched)
        await sched.shutdown(5)

    run(main)


def test_event_loop_ending_without_shutdown_leaves_workers_quiet(model: Any) -> None:
    """asyncio.run() returning with work in flight: the request is cancelled, the worker's late
    report to the closed loop is dropped silently, no thread raises."""
    sched_box: list[Scheduler] = []

    async def main() -> None:
        sched = await started(model, settings())
        sched_box.append(sched)
        task = asyncio.create_task(sched.submit("rr", prep(model, 1, fault="slow:300")))
        await asyncio.sleep(0.05)
        assert not task.done()

    run(main)
    time.sleep(0.5)  # the worker finishes and reports to a closed loop
    assert sched_box[0].stats()["workers_alive"] == 1
    assert all(t.is_alive() for t in sched_box[0].workers.threads)


# ------------------------------------------------------------------------------------ small contracts
def test_contract_errors_and_empty_requests(model: Any) -> None:
    async def main() -> None:
        sched = Scheduler({"rr": model}, settings())
        assert not sched.is_healthy() and not sched.is_accepting()
        await sched.start()
        assert sched.is_healthy() and sched.is_accepting()
        with pytest.raises(ModelNotFoundError):
            await sched.submit("nope", prep(model, 1))
        empty = model.prepare_pairs("q", [])
        assert (await sched.submit("rr", empty)).shape[0] == 0

        # a raising is_cancelled callback counts as a departed client, never a hang
        def boom() -> bool:
            raise RuntimeError("x")

        blocker = asyncio.create_task(sched.submit("rr", prep(model, 1, fault="slow:300")))
        await asyncio.sleep(0.05)
        with pytest.raises(CancelledRequestError):
            await sched.submit("rr", prep(model, 1), is_cancelled=boom)
        await blocker
        timings: dict[str, float] = {}
        await sched.submit("rr", prep(model, 2), timings=timings)
        assert set(timings) >= {"admission_s", "queue_s", "inference_s", "batches"}
        assert timings["batches"] == 1
        assert sched.stats()["workers_alive"] == 1
        await sched.shutdown(5)

    run(main)


def test_bad_knobs_are_refused_by_the_settings() -> None:
    """The scheduler trusts ``Settings`` for its knobs' ranges; a bad one never reaches it."""
    for bad in ({"workers": 0}, {"max_batch_size": 0}, {"max_queued_items": 0}, {"max_wait_ms": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            settings(**bad)


def test_fault_option_ignored_unless_enabled(model: Any) -> None:
    async def main() -> None:
        sched = await started(model, settings(fault_injection=False))
        assert (await sched.submit("rr", prep(model, 2, fault="kill_worker"))).shape == (2, 1)
        assert sched.is_healthy()
        await sched.shutdown(5)

    run(main)

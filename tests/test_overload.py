"""Overload: work-based admission, fair scheduling between requests, per-request unit caps.

The stand-in model (``tests/fakes.py``) costs ``per_token_s`` per padded token, so how much work
the scheduler can finish within a deadline is known and the throughput it measures is the one it
should admit by. Orders and latency bounds below are in units of that controlled forward time
(several-fold margins), not wall-clock luck. Each test would fail on a scheduler that admits by
item count and serves units first-in first-out (what it did before).
"""

from __future__ import annotations

import asyncio
import functools
import math
import random
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fakes import STALL_WORD, fake_model, fake_session

from encapure.engine.estimate import estimate_pairs, token_bound
from encapure.engine.types import Prepared
from encapure.errors import DeadlineExceededError, OverloadedError, PayloadTooLargeError
from encapure.scheduler import Scheduler, SchedulerMetrics
from encapure.scheduler.admission import BACKLOG_FRACTION, Admission
from encapure.server.testing import InProcessServer
from encapure.settings import Settings

pytestmark = pytest.mark.timeout(120)

WORDS = ["the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as", "by", "it", "at", "from", "his", "an", "were", "are", "which", "this", "be", "or"]


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def metric(m: SchedulerMetrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


class Counted:
    """A prepare function that counts its calls (a refused request must never be tokenized)."""

    def __init__(self, model: Any, query: str, docs: list[str], **kw: Any) -> None:
        self.fn = functools.partial(model.prepare_pairs, query, docs, **kw)
        self.calls = 0

    def __call__(self) -> Prepared:
        self.calls += 1
        return self.fn()


def estimate(model: Any, query: str, docs: list[str], window: bool = False) -> Any:
    return estimate_pairs([query] * len(docs), docs, max_length=model.max_length, specials=4, window=window,
                          overlap=model.window_overlap)


async def run_one(sched: Scheduler, model: Any, query: str, docs: list[str], **kw: Any) -> tuple[Any, float, Counted]:
    prep = Counted(model, query, docs)
    t = time.monotonic()
    try:
        out: Any = await sched.run("rr", prep, model.finish, estimate=estimate(model, query, docs), **kw)
    except Exception as e:
        out = e
    return out, time.monotonic() - t, prep


# --------------------------------------------------------------------------- admission by work
def test_retry_after_is_the_measured_drain_time() -> None:
    adm = Admission(100, 10_000, 0.5, SchedulerMetrics())
    adm.observe(4000.0, 1.0, 1)  # 4,000 work/s measured
    t = asyncio.run(_grant(adm, 10, 26_000.0))
    assert adm.retry_after() == math.ceil(26_000 / 4000)  # 7 s, not a constant 1
    adm.computed(t, 20_000.0)
    assert adm.retry_after() == 2.0
    adm.release(t, claimed=False)
    assert adm.work == 0 and adm.items == 0


async def _grant(adm: Admission, units: int, work: float) -> Any:
    return await adm.admit(units, work, time.monotonic() + 1000)


def test_admission_shares_are_settings() -> None:
    """``admission_backlog_share`` and ``admission_deadline_share`` bound what is admitted: the
    same requests fit under one share and are refused at once under a smaller one."""

    async def third_fits(third: float, **shares: float) -> bool:
        adm = Admission(100, 10_000, 0.0, SchedulerMetrics(), backlog_s=10.0, **shares)
        adm.observe(1000.0, 1.0, 1)  # 1,000 work/s: 1 s of work is 1,000
        await adm.admit(1, 500.0, time.monotonic() + 100)
        await adm.admit(1, 500.0, time.monotonic() + 100)
        try:
            await adm.admit(1, third, time.monotonic() + 100)
        except OverloadedError:
            return False
        return True

    assert asyncio.run(third_fits(100.0)) is True  # 1.1 s of backlog, within 0.33 x 10 s
    assert asyncio.run(third_fits(100.0, backlog_share=0.1)) is False  # over 0.1 x 10 s
    assert asyncio.run(third_fits(600.0)) is True
    # 1 s ahead of it plus its own 0.6 s: over 1.2% of the 100 s it has left
    assert asyncio.run(third_fits(600.0, deadline_share=0.012)) is False
    sched = Scheduler({}, Settings(admission_backlog_share=0.2, admission_deadline_share=0.7))
    assert (sched.admission.backlog_share, sched.admission.deadline_share) == (0.2, 0.7)
    assert sched.stats()["limits"]["admission_backlog_share"] == 0.2


def test_overload_is_refused_fast_untokenized_and_admitted_work_meets_its_deadline() -> None:
    """Twice what fits within the deadline arrives at once: what is admitted all finishes in time
    (no deadline_exceeded, nothing computed for nothing); the rest gets a fast 503 with a Retry-After
    from the drain time, and is never tokenized."""
    deadline_s = 6.0
    model = fake_model("rerank", name="rr", settings=Settings(threads_per_worker=1), per_token_s=1e-4)
    metrics = SchedulerMetrics()
    s = Settings(workers=1, request_timeout_s=deadline_s, admission_timeout_s=0.3, max_wait_ms=1)
    rng = random.Random(1)
    batch = [(words(rng, 5), [words(rng, 20) for _ in range(16)]) for _ in range(250)]
    warm: list[int] = []

    async def main() -> list[tuple[Any, float, Counted]]:
        sched = Scheduler({"rr": model}, s, metrics)
        await sched.start()
        # a measured stretch of busy time: the rate is known (one batch's rate is only a guess)
        while not sched.admission.measured:
            await run_one(sched, model, "warm", [words(rng, 20)] * 8)
            warm.append(8)
        results = await asyncio.gather(*(run_one(sched, model, q, d) for q, d in batch))
        st = sched.stats()
        assert st["active_requests"] == 0 and st["items_in_system"] == 0, st
        await sched.shutdown(5)
        return results

    results = asyncio.run(main())
    served = [r for r in results if not isinstance(r[0], Exception)]
    refused = [r for r in results if isinstance(r[0], OverloadedError)]
    others = [r[0] for r in results if isinstance(r[0], Exception) and not isinstance(r[0], OverloadedError)]
    assert not others, others[:3]  # no deadline_exceeded: everything admitted finished in time
    assert len(served) >= 10 and len(refused) >= 30, (len(served), len(refused))
    for _, dt, prep in refused:
        assert dt < s.admission_timeout_s + 0.5, dt
        assert prep.calls == 0  # refused before tokenizing
    afters = [r[0].retry_after for r in refused]
    # the admitted work drains in at most BACKLOG_FRACTION x the deadline: that is the Retry-After
    assert max(afters) >= 2, afters
    assert all(1 <= a <= math.ceil(BACKLOG_FRACTION * deadline_s) + 2 for a in afters), afters
    assert metric(metrics, "encapure_discarded_units_total") == 0
    assert metric(metrics, "encapure_dropped_items_total", reason="deadline") == 0
    # the realized batches and the queue, as the metrics tell them, match what the model ran
    ran = fake_session(model).batches[2:]  # after the model's own warm-up shapes
    assert metric(metrics, "encapure_batch_size_sum", model="rr") == sum(n for n, _ in ran)
    assert metric(metrics, "encapure_batches_total", model="rr") == len(ran)
    assert metric(metrics, "encapure_batch_size_sum", model="rr") == sum(warm) + sum(
        len(docs) for (out, _, _), (_, docs) in zip(results, batch, strict=True) if not isinstance(out, Exception)
    )
    assert metric(metrics, "encapure_batch_tokens_sum", model="rr") == sum(n * w for n, w in ran)
    assert metric(metrics, "encapure_batch_requests_count", model="rr") == len(ran)
    assert metric(metrics, "encapure_queue_seconds_count", model="rr") == len(warm) + len(served)
    assert metric(metrics, "encapure_queue_depth_items", model="rr") == 0
    assert metric(metrics, "encapure_admitted_work_seconds") == 0
    assert metric(metrics, "encapure_requests_in_scheduler") == 0
    assert metric(metrics, "encapure_rejected_requests_total", reason="overloaded") == len(refused)


def test_a_cold_scheduler_flooded_at_once_admits_no_more_than_it_finishes_in_time() -> None:
    """A freshly started scheduler, its throughput not yet measured, gets far more work than fits
    its deadline at once and again while the first is running. The model is 8x slower than the
    rate admission assumes before measuring (``COLD_RATE``): admitting 10 s of that guess made
    the later requests wait past their deadline (a storm on a freshly started server got 125
    ``deadline_exceeded``). Every request must be served in time or refused fast, none expire."""
    deadline_s = 6.0
    model = fake_model("rerank", name="rr", settings=Settings(threads_per_worker=1), per_token_s=5e-3,
                       max_length=128)
    metrics = SchedulerMetrics()
    s = Settings(workers=2, request_timeout_s=deadline_s, admission_timeout_s=0.3, max_wait_ms=1,
                 max_batch_tokens=512, max_batch_size=8)
    rng = random.Random(3)
    waves = [[(words(rng, 5), [words(rng, 12) for _ in range(4)]) for _ in range(40)] for _ in range(3)]

    async def wave(sched: Scheduler, delay: float, reqs: list[tuple[str, list[str]]]) -> list[Any]:
        await asyncio.sleep(delay)
        return await asyncio.gather(*(run_one(sched, model, q, d) for q, d in reqs))

    async def main() -> list[tuple[Any, float, Counted]]:
        sched = Scheduler({"rr": model}, s, metrics)
        await sched.start()
        out = await asyncio.gather(*(wave(sched, 2.0 * i, w) for i, w in enumerate(waves)))
        await sched.shutdown(5)
        return [r for w in out for r in w]

    results = asyncio.run(main())
    served = [r for r in results if not isinstance(r[0], Exception)]
    refused = [r for r in results if isinstance(r[0], OverloadedError)]
    others = [r[0] for r in results if isinstance(r[0], Exception) and not isinstance(r[0], OverloadedError)]
    assert not others, (len(others), others[:3])  # no deadline_exceeded
    assert len(served) >= 8 and len(refused) >= 30, (len(served), len(refused))
    for _, dt, prep in refused:
        assert dt < s.admission_timeout_s + 0.5, dt
        assert prep.calls == 0
    for _, dt, _ in served:
        assert dt < deadline_s, dt
    assert metric(metrics, "encapure_dropped_items_total", reason="deadline") == 0
    assert metric(metrics, "encapure_discarded_units_total") == 0


def test_the_first_busy_measurement_replaces_the_guess() -> None:
    """One batch's rate times the workers is a guess that overstates a shared CPU; blended with it,
    the first real measurement would still admit by most of the guess."""
    adm = Admission(100, 10_000, 0.5, SchedulerMetrics(), cold_work=1000.0)
    adm.observe(400.0, 0.05, 2)  # a small batch: 16,000 work/s guessed
    assert not adm.measured
    adm.observe_busy(4000.0, 1.0)  # 4,000 work/s sustained
    assert adm.measured and adm.throughput == 4000.0
    adm.observe_busy(2000.0, 1.0)  # later samples blend (an outlier moves it at most 2x)
    assert 2000.0 < adm.throughput < 4000.0
    # a first sample that caught a stall lowers the guess by at most 4x
    stalled = Admission(100, 10_000, 0.5, SchedulerMetrics(), cold_work=1000.0)
    stalled.observe(400.0, 0.05, 2)
    stalled.observe_busy(20.0, 1.5)
    assert stalled.throughput == 4000.0


def test_before_the_rate_is_measured_admission_counts_with_a_quarter_of_the_guess() -> None:
    async def main() -> None:
        adm = Admission(100, 10_000, 0.0, SchedulerMetrics(), backlog_s=1.0, cold_work=1000.0)
        adm.observe(400.0, 0.05, 2)  # guessed 16,000 work/s: a backlog of 0.33 s is 5,280 by the guess
        await adm.admit(1, 600.0, time.monotonic() + 100)  # within what the workers start at once
        await adm.admit(1, 600.0, time.monotonic() + 100)  # 1,200: within a quarter of the guess (1,320)
        with pytest.raises(OverloadedError):
            await adm.admit(1, 600.0, time.monotonic() + 100)  # 1,800: over it
        adm.observe_busy(16_000.0, 1.0)  # measured: the whole rate counts
        await adm.admit(1, 600.0, time.monotonic() + 100)

    asyncio.run(main())


def test_rejection_series_start_at_zero() -> None:
    m = SchedulerMetrics()
    for reason in ("overloaded", "shutting_down", "worker_died", "too_large"):
        assert metric(m, "encapure_rejected_requests_total", reason=reason) == 0.0
    for reason in ("deadline", "cancelled", "shutdown", "worker_died", "error"):
        assert metric(m, "encapure_dropped_items_total", reason=reason) == 0.0
    assert metric(m, "encapure_discarded_units_total") == 0.0


def test_deadline_expired_work_is_never_computed() -> None:
    model = fake_model("rerank", name="rr", settings=Settings(threads_per_worker=1), stall_s=0.1)
    metrics = SchedulerMetrics()
    s = Settings(workers=1, max_wait_ms=1)

    async def main() -> None:
        sched = Scheduler({"rr": model}, s, metrics)
        await sched.start()
        slow = asyncio.create_task(run_one(sched, model, "q", [" ".join([STALL_WORD] * 8)]))
        await asyncio.sleep(0.1)
        before = len(fake_session(model).batches)
        out, _, _ = await run_one(sched, model, "q", ["late " * 3] * 5, deadline=time.monotonic() + 0.2)
        assert isinstance(out, DeadlineExceededError), out
        assert not isinstance((await slow)[0], Exception)
        await asyncio.sleep(0.05)
        assert len(fake_session(model).batches) == before  # the expired request's units never ran
        await sched.shutdown(5)

    asyncio.run(main())
    assert metric(metrics, "encapure_dropped_items_total", reason="deadline") == 5
    assert metric(metrics, "encapure_discarded_units_total") == 0


# ------------------------------------------------------------------------------- fair scheduling
def _fair_setup(workers: int, per_token_s: float) -> tuple[Any, Settings]:
    model = fake_model("rerank", name="rr", settings=Settings(threads_per_worker=1), per_token_s=per_token_s,
                       max_length=128)
    s = Settings(workers=workers, max_wait_ms=1, max_batch_tokens=1024, max_batch_size=16)
    return model, s


def test_small_requests_are_interleaved_with_a_heavy_one() -> None:
    """One worker, a heavy request of 64 long units (8 batches of 8 x 128 tokens) and, once it runs,
    small requests: each small one goes in the next batch, not after the whole heavy request."""
    model, s = _fair_setup(1, 1e-4)  # a heavy batch: 1024 tokens = ~0.1 s
    rng = random.Random(2)
    heavy_docs = [words(rng, 150) for _ in range(64)]
    finished: dict[str, float] = {}

    async def timed(tag: str, q: str, docs: list[str]) -> Any:
        out, dt, _ = await run_one(sched_ref[0], model, q, docs)
        finished[tag] = time.monotonic()
        return out, dt

    sched_ref: list[Scheduler] = []

    async def main() -> list[Any]:
        sched = Scheduler({"rr": model}, s)
        sched_ref.append(sched)
        await sched.start()
        heavy = asyncio.create_task(timed("heavy", "heavy query", heavy_docs))
        await asyncio.sleep(0.15)
        smalls = []
        for i in range(4):
            smalls.append(asyncio.create_task(timed(f"small{i}", f"q{i}", ["a short one", "another"])))
            await asyncio.sleep(0.05)
        out = [await heavy] + [await t for t in smalls]
        await sched.shutdown(5)
        return out

    outs = asyncio.run(main())
    assert not any(isinstance(o[0], Exception) for o in outs), outs
    heavy_s = outs[0][1]
    for i, (_, dt) in enumerate(outs[1:]):
        assert finished[f"small{i}"] < finished["heavy"], finished
        # at most the heavy batch already running, then its own: ~0.2 s; FIFO would be ~0.6 s+
        assert dt < heavy_s / 2, (dt, heavy_s)


def test_a_heavy_request_leaves_a_worker_free_for_small_ones() -> None:
    """Two workers: the heavy request runs on one, so a small request starts at once on the other
    instead of waiting for a long batch to end."""
    model, s = _fair_setup(2, 3e-4)  # a heavy batch: 1024 tokens = ~0.3 s
    rng = random.Random(3)
    heavy_docs = [words(rng, 150) for _ in range(48)]

    async def main() -> tuple[Any, list[Any]]:
        sched = Scheduler({"rr": model}, s)
        await sched.start()
        heavy = asyncio.create_task(run_one(sched, model, "heavy query", heavy_docs))
        smalls = []
        for i in range(5):
            await asyncio.sleep(0.13)
            smalls.append(await run_one(sched, model, f"q{i}", ["short", "docs"]))
        h = await heavy
        await sched.shutdown(5)
        return h, smalls

    heavy, smalls = asyncio.run(main())
    assert not isinstance(heavy[0], Exception)
    lat = [dt for _, dt, _ in smalls]
    assert heavy[1] > 0.8, heavy[1]  # the small ones all arrived while it ran
    assert max(lat) < 0.15, (lat, heavy[1])  # a heavy batch is ~0.3 s: none waited for one


# ---------------------------------------------------------------------------- per-request caps
@pytest.fixture(scope="module")
def capped() -> Any:
    model = fake_model("rerank", name="rr", max_length=64)
    settings = Settings(max_units_per_request=8, max_tokenize_tokens=50, fault_injection=True, workers=1,
                        max_concurrent_requests=1, admission_timeout_s=0.2)
    return model, settings


def _serve(capped: Any, fn: Callable[[InProcessServer], Any]) -> Any:
    model, settings = capped

    async def main() -> Any:
        async with InProcessServer({"rr": model}, settings) as srv:
            return await fn(srv)

    return asyncio.run(main())


def test_too_many_units_is_413_with_the_count_windows_included(capped: Any) -> None:
    model, _ = capped
    long_doc = words(random.Random(4), 400)
    need = len(model.prepare_pairs("q", [long_doc], long_documents="window").units)
    assert need > 8

    async def go(srv: InProcessServer) -> list[httpx.Response]:
        c = srv.client
        return [
            await c.post("/rerank", json={"query": "q", "documents": [long_doc], "long_documents": "window"}),
            await c.post("/rerank", json={"query": "q", "documents": ["d"] * 9}),
            await c.post("/rerank", json={"query": "q", "documents": [long_doc]}),  # truncated: 1 unit
            await c.post("/v1/rerank", json={"query": "q", "documents": [long_doc], "max_chunks_per_doc": 20}),
        ]

    windowed, many, truncated, chunks = _serve(capped, go)
    assert windowed.status_code == 413, windowed.text
    msg = windowed.json()["error"]["message"]
    assert f"needs {need} units" in msg and "at most 8" in msg and "--max-units-per-request" in msg
    assert many.status_code == 413 and "at least 9 units" in many.json()["error"]["message"]
    assert truncated.status_code == 200
    assert chunks.status_code == 413, chunks.text


def test_tokenize_goes_through_admission_and_has_a_response_cap(capped: Any) -> None:
    async def go(srv: InProcessServer) -> tuple[httpx.Response, float, httpx.Response, httpx.Response]:
        c = srv.client
        busy = asyncio.create_task(
            c.post("/rerank", json={"query": "q", "documents": ["d"]}, headers={"x-encapure-fault": "slow:800"})
        )
        await asyncio.sleep(0.2)
        t = time.monotonic()
        refused = await c.post("/tokenize", json={"inputs": "hello world"})
        dt = time.monotonic() - t
        assert (await busy).status_code == 200
        big = await c.post("/tokenize", json={"inputs": [words(random.Random(5), 40)] * 3})
        huge = await c.post("/tokenize", json={"inputs": "word " * 2000})  # refused untokenized
        assert huge.status_code == 413 and "would answer about" in huge.json()["error"]["message"], huge.text
        ok = await c.post("/tokenize", json={"inputs": "hello world"})
        return refused, dt, big, ok

    refused, dt, big, ok = _serve(capped, go)
    assert refused.status_code == 503 and refused.json()["error"]["type"] == "overloaded_error", refused.text
    assert dt < 1.0
    assert big.status_code == 413 and "more than 50" in big.json()["error"]["message"], big.text
    assert "--max-tokenize-tokens" in big.json()["error"]["message"]
    assert ok.status_code == 200 and [t["text"] for t in ok.json()[0] if not t["special"]] == ["hello", "world"]


# --------------------------------------------------------------------------------- estimates
def test_estimates_bound_the_real_size() -> None:
    model = fake_model("rerank", name="rr", max_length=64)
    rng = random.Random(6)
    texts = [words(rng, n) for n in (1, 10, 100, 400)] + ["naïve café ünïcode", "東京都の天気", "emoji 🎉🎉 ok", "a" * 300]
    encs = model.encode_batch(texts, "raw", add_special_tokens=False)
    for t, e in zip(texts, encs, strict=True):
        assert len(e.ids) <= token_bound(t), t
    for window in (False, True):
        est = estimate(model, "a query here", texts, window=window)
        prep = model.prepare_pairs("a query here", texts, long_documents="window" if window else "truncate")
        assert est.inputs == len(texts)
        assert est.units >= len(prep.units)
        assert est.tokens >= sum(len(u) for u in prep.units)
        assert est.likely_units <= est.units and est.likely_tokens <= est.tokens


def test_a_request_that_cannot_finish_by_its_deadline_is_refused_before_compute() -> None:
    """Once the throughput is measured, a request whose own work outlasts its deadline on an idle
    server gets 413 at once (nothing computed and thrown away at the deadline)."""
    model = fake_model("rerank", name="rr", settings=Settings(threads_per_worker=1), per_token_s=1e-4,
                       max_length=128)
    metrics = SchedulerMetrics()
    s = Settings(workers=1, request_timeout_s=2.0, max_wait_ms=1)
    rng = random.Random(7)
    big = [words(rng, 150) for _ in range(300)]  # ~300 x 128 tokens at ~10k/s: ~4 s > 1 s allowed

    async def main() -> None:
        sched = Scheduler({"rr": model}, s, metrics)
        await sched.start()
        await run_one(sched, model, "warm", ["up"] * 8)
        before = len(fake_session(model).batches)
        out, dt, _ = await run_one(sched, model, "q", big)
        assert isinstance(out, PayloadTooLargeError), out
        assert "s of compute" in out.message and "split it" in out.message
        assert len(fake_session(model).batches) == before and dt < 1.0
        ok, _, _ = await run_one(sched, model, "q", big[:20])  # what fits is served
        assert not isinstance(ok, Exception), ok
        await sched.shutdown(5)

    asyncio.run(main())
    assert metric(metrics, "encapure_rejected_requests_total", reason="too_large") == 1


def test_a_one_batch_request_is_never_refused_on_a_wrong_estimate() -> None:
    """A throughput estimate taken from one-time costs (a bge-reranker-v2-m3 int4 IR's first inference
    repacks its weights) once made every 8 x 64 request 413 for good: nothing admitted, nothing
    measured again. A request that fits in one batch is served; a bigger one is still refused; and
    forgetting the estimate (what the server does after its warm-up) returns to the cold regime."""
    model = fake_model("rerank", name="rr", settings=Settings(threads_per_worker=1), per_token_s=1e-5,
                       max_length=128)
    s = Settings(workers=1, request_timeout_s=2.0, max_wait_ms=1)
    rng = random.Random(8)

    async def main() -> None:
        sched = Scheduler({"rr": model}, s, SchedulerMetrics())
        await sched.start()
        await run_one(sched, model, "warm", ["up"] * 8)
        sched.admission.rate, sched.admission._busy_samples = 1.0, 1  # "measured": 1 work per second
        ok, _, _ = await run_one(sched, model, "q", [words(rng, 40) for _ in range(8)])
        assert not isinstance(ok, Exception), ok
        big, _, _ = await run_one(sched, model, "q", [words(rng, 150) for _ in range(300)])
        assert isinstance(big, PayloadTooLargeError), big
        sched.forget_throughput()
        assert not sched.admission.measured and sched.admission.rate == 0
        await sched.shutdown(5)

    asyncio.run(main())


def test_a_huge_truncated_text_is_cut_before_tokenizing_with_the_same_tokens() -> None:
    """A document truncated at max_length keeps exactly the tokens the whole text would give,
    though only its first characters are tokenized (a megabyte costs what a few kilobytes do)."""
    model = fake_model("rerank", name="rr", max_length=64)
    embedder = fake_model("embed", name="emb", max_length=64)
    rng = random.Random(8)
    huge = " ".join(words(rng, 1) + ("," if i % 7 == 0 else "") for i in range(40_000))  # ~120 KB
    for side in ("right", "left"):
        for m in (model, embedder):
            m.truncation_side = side  # type: ignore[assignment]
            m._tok_mode = None  # the tokenizer is reconfigured for the new side
        got = model.prepare_pairs("a query", [huge, "short"]).units
        whole = model.encode_batch([("a query", huge), ("a query", "short")], "pair")
        assert [list(u.ids) for u in got] == [list(e.ids) for e in whole], side
        emb = embedder.prepare_texts([huge]).units
        assert list(emb[0].ids) == list(embedder.encode_batch([huge], "single")[0].ids), side


def test_clipping_a_huge_text_tokenizes_only_what_it_keeps() -> None:
    """The routes' per-request cut (TEI truncation_direction, Cohere max_tokens_per_doc) gives the
    text the whole-text tokenization would, from either side."""
    from encapure.server.routes.common import _clip

    model = fake_model("rerank", name="rr", max_length=64)
    rng = random.Random(9)
    huge = " ".join(words(rng, 1) for _ in range(30_000))
    enc = model.encode_batch([huge], "raw", add_special_tokens=False)[0]
    n = len(enc.ids)
    assert _clip(model, [huge], [20], "right") == [huge[: enc.offsets[19][1]]]
    assert _clip(model, [huge], [20], "left") == [huge[enc.offsets[n - 20][0] :]]

"""Scheduler measurements (not a test): ``python -m benchmarks.scheduler_bench [--model FOLDER]``.

0. The scheduler's own cost with a fixed-cost stand-in model (no ONNX Runtime noise).
1. Latency at concurrency 1: the engine called directly vs the scheduler at several
   ``max_wait_ms`` — shows that the batching window adds no latency to a lone request.
2. Throughput with many concurrent clients: requests run one by one through the engine (what a
   server without cross-request batching does) vs the scheduler, for worker/thread layouts.

Variants are interleaved round by round in one process so that load from other processes on a
shared machine hits them alike; medians are reported.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

from encapure.engine import load_model
from encapure.scheduler import Scheduler
from encapure.settings import Settings

_WORD_TEXT = (
    "the of and to in is was for on that with as by it at from his an were are which this be or has "
    "had first one their its new after who they have her she two been other when there all during "
    "into school time may years more most only over city some world would where later up such used"
)
_WORDS = _WORD_TEXT.split()


def _text(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(lo, hi)))


def _requests(
    n: int, seed: int, docs: tuple[int, int], words: tuple[int, int]
) -> list[tuple[str, list[str]]]:
    rng = random.Random(seed)
    return [(_text(rng, 3, 10), [_text(rng, *words) for _ in range(rng.randint(*docs))]) for _ in range(n)]


def _default_model() -> str:
    found = sorted(glob.glob(".work/test-models/reranker-int8-*[0-9a-f]"))
    if not found:
        raise SystemExit("no --model given and no .work/test-models/reranker-int8-* (run the tests once)")
    return found[-1]


async def _with_scheduler(model: Any, settings: Settings, body: Callable[[Scheduler], Any]) -> Any:
    sched = Scheduler({"m": model}, settings)
    await sched.start()
    try:
        return await body(sched)
    finally:
        await sched.shutdown(10)


def latency(model_dir: str, rounds: int) -> None:
    """Lone requests: does the batching window add latency, and do idle workers share a request?"""
    m1 = load_model(model_dir, settings=Settings(threads_per_worker=1), name="m")
    m2 = load_model(model_dir, settings=Settings(threads_per_worker=2), name="m")
    reqs = _requests(rounds, 1, (16, 16), (10, 40))
    preps = [m1.prepare_pairs(q, d) for q, d in reqs]
    # label -> (model, settings or None for the engine called directly, split_idle)
    variants: dict[str, tuple[Any, Settings | None, bool]] = {
        "engine 1 thread": (m1, None, False),
        "engine 2 threads": (m2, None, False),
        "sched 1x2 max_wait=0ms": (m2, Settings(workers=1, max_wait_ms=0), True),
        "sched 1x2 max_wait=2ms": (m2, Settings(workers=1, max_wait_ms=2), True),
        "sched 1x2 max_wait=50ms": (m2, Settings(workers=1, max_wait_ms=50), True),
        "sched 2x1 no split": (m1, Settings(workers=2, max_wait_ms=2), False),
        "sched 2x1 split idle": (m1, Settings(workers=2, max_wait_ms=2), True),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}

    async def run() -> None:
        scheds: dict[str, Scheduler] = {}
        for label, (model, st, split) in variants.items():
            if st is not None:
                new = Scheduler({"m": model}, st)
                new.split_idle = split
                await new.start()
                await new.submit("m", preps[0])  # warm
                scheds[label] = new
        order = list(variants)
        shuffler = random.Random(0)
        for p in preps:
            shuffler.shuffle(order)  # no variant always runs right after a spinning 2-thread one
            for label in order:
                model = variants[label][0]
                t = time.perf_counter()
                sch = scheds.get(label)
                if sch is None:
                    model.finish(p, model.run_prepared(p))
                else:
                    p2 = await sch.prepare(lambda p=p: p)
                    model.finish(p2, await sch.submit("m", p2))
                times[label].append(time.perf_counter() - t)
        for done in scheds.values():
            await done.shutdown(5)

    asyncio.run(run())
    print(f"\n## latency at concurrency 1 (16 pairs x ~20-55 tokens, {rounds} rounds, interleaved)")
    base = statistics.median(times["engine 2 threads"])
    for k, v in times.items():
        v.sort()
        med = statistics.median(v)
        p90 = v[int(0.9 * (len(v) - 1))]
        print(f"  {k:26s} median {med * 1e3:7.2f} ms   p90 {p90 * 1e3:7.2f} ms   x{med / base:5.2f}")


def throughput(
    model_dir: str, n_requests: int, concurrency: int, repeats: int, docs: tuple[int, int] = (1, 8)
) -> None:
    layouts = [(1, 2), (2, 1)]  # (workers, threads per worker)
    models = {
        lay: load_model(model_dir, settings=Settings(workers=lay[0], threads_per_worker=lay[1]), name="m")
        for lay in layouts
    }
    reqs = _requests(n_requests, 2, docs, (5, 60))
    n_pairs = sum(len(d) for _, d in reqs)
    results: dict[str, list[float]] = {}
    batch_info: dict[str, list[float]] = {}

    def one_by_one(lay: tuple[int, int]) -> float:
        m = models[lay]
        t = time.perf_counter()
        for q, d in reqs:
            m(m.prepare_pairs(q, d))
        return time.perf_counter() - t

    def scheduled(lay: tuple[int, int]) -> float:
        m = models[lay]
        s = Settings(workers=lay[0], threads_per_worker=lay[1])

        async def body(sched: Scheduler) -> float:
            sem = asyncio.Semaphore(concurrency)

            async def client(q: str, d: list[str]) -> None:
                async with sem:
                    p = await sched.prepare(m.prepare_pairs, q, d)
                    m.finish(p, await sched.submit("m", p))

            t = time.perf_counter()
            await asyncio.gather(*(client(q, d) for q, d in reqs))
            el = time.perf_counter() - t
            st = sched.stats()
            batch_info.setdefault(f"sched {lay[0]}x{lay[1]}", []).append(st["units_computed"] / st["batches"])
            return el

        return float(asyncio.run(_with_scheduler(m, s, body)))

    for r in range(repeats):
        for lay in layouts if r % 2 == 0 else layouts[::-1]:
            results.setdefault(f"one-by-one {lay[0]}x{lay[1]}", []).append(one_by_one(lay))
            results.setdefault(f"sched {lay[0]}x{lay[1]}", []).append(scheduled(lay))
    print(
        f"\n## throughput: {n_requests} requests ({n_pairs} pairs, {docs[0]}-{docs[1]} docs of 5-60 words), "
        f"{concurrency} concurrent clients, median of {repeats}"
    )
    base = n_pairs / statistics.median(results["one-by-one 1x2"])
    for k, v in results.items():
        pps = n_pairs / statistics.median(v)
        extra = ""
        if k in batch_info:
            extra = f"   mean batch {statistics.mean(batch_info[k]):5.1f} units"
        print(f"  {k:22s} {pps:8.1f} pairs/s   x{pps / base:5.2f}{extra}")


class _FixedCostModel:
    """A ``Runner`` whose forward costs a fixed time and releases the GIL (as ORT does), so the
    scheduler's own cost is measured without ONNX Runtime's noise on a shared machine."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def forward(self, units: list[Any]) -> Any:
        import numpy as np

        if self.seconds:
            time.sleep(self.seconds)
        return np.zeros((len(units), 1), dtype=np.float32)


def overhead(rounds: int) -> None:
    """The scheduler's own cost: latency added at concurrency 1 and bookkeeping per unit."""
    import numpy as np

    from encapure.engine.types import Prepared, Unit

    def prep(n: int) -> Prepared:
        units = [Unit(np.arange(40, dtype=np.int64)) for _ in range(n)]
        return Prepared(units, np.arange(n), n, [40] * n, [False] * n, {})

    async def lone() -> dict[str, list[float]]:
        model = _FixedCostModel(0.005)
        scheds = {}
        for w in (0.0, 2.0, 50.0):
            sch = Scheduler({"m": model}, Settings(workers=1, max_wait_ms=w))
            await sch.start()
            scheds[f"sched max_wait={w:g}ms"] = sch
        times: dict[str, list[float]] = {"direct forward": [], **{k: [] for k in scheds}}
        p = prep(8)
        for _ in range(rounds):
            t = time.perf_counter()
            model.forward(p.units)
            times["direct forward"].append(time.perf_counter() - t)
            for k, sch in scheds.items():
                t = time.perf_counter()
                p2 = await sch.prepare(lambda: p)
                await sch.submit("m", p2)
                times[k].append(time.perf_counter() - t)
        for sch in scheds.values():
            await sch.shutdown(5)
        return times

    times = asyncio.run(lone())
    print(f"\n## scheduler overhead, fixed-cost model (forward = 5 ms sleep), concurrency 1, {rounds} rounds")
    base = statistics.median(times["direct forward"])
    for k, v in times.items():
        med = statistics.median(v)
        print(f"  {k:24s} median {med * 1e3:7.3f} ms   (+{(med - base) * 1e3:6.3f} ms)")

    async def flood(conc: int, n_req: int, units: int) -> float:
        sch = Scheduler({"m": _FixedCostModel(0.0)}, Settings(workers=1, max_wait_ms=0))
        await sch.start()
        preps = [prep(units) for _ in range(n_req)]
        sem = asyncio.Semaphore(conc)

        async def one(p: Prepared) -> None:
            async with sem:
                await sch.submit("m", p)

        t = time.perf_counter()
        await asyncio.gather(*(one(p) for p in preps))
        el = time.perf_counter() - t
        await sch.shutdown(5)
        return el

    print("  bookkeeping with a zero-cost model (everything but the forward pass):")
    for conc, n_req, units in ((32, 3000, 2), (32, 400, 50)):
        el = asyncio.run(flood(conc, n_req, units))
        print(
            f"    {conc} concurrent, {units} units/request: {el / n_req * 1e6:7.1f} us/request, "
            f"{el / (n_req * units) * 1e6:6.1f} us/unit"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="exported reranker folder (default: the int8 test model)")
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--docs", default="1-8", help="documents per request, MIN-MAX (default 1-8)")
    ap.add_argument("--only", choices=["overhead", "latency", "throughput"], default=None)
    args = ap.parse_args()
    if args.only in (None, "overhead"):
        overhead(max(args.rounds, 100))
    if args.only == "overhead":
        return  # no model needed
    model_dir = args.model or _default_model()
    print(f"model: {model_dir}")
    if args.only in (None, "latency"):
        latency(model_dir, args.rounds)
    if args.only in (None, "throughput"):
        lo, hi = (int(x) for x in args.docs.split("-"))
        throughput(model_dir, args.requests, args.concurrency, args.repeats, (lo, hi))


if __name__ == "__main__":
    main()

"""How much throughput the HTTP layer costs: the same WikiQA rerank requests, at saturation,
(a) the engine alone, request after request, (b) in-process through the scheduler (cross-request
batching, no HTTP) and (c) through a real `encapure serve` process with an aiohttp client,
alternated in one run.

    python scripts/bench_server_overhead.py [MODEL_DIR] [--questions 120] [--concurrency 32] [--rounds 2] [--docs N]

The client shares the machine with the server, so (c) also pays for the client's CPU: the ratio is
a lower bound of the server's own efficiency. Prints pairs/s of each run and the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ENCAPURE_SHARED", ROOT.parent / "shared"))
WIKIQA = SHARED / "data" / "wikiqa" / "WikiQA-test-gold.tsv"


def load_requests(n: int) -> list[tuple[str, list[str]]]:
    """The first ``n`` WikiQA questions, each with its candidate sentences: one rerank request each."""
    from encapure.evaluation import load_dataset

    return [(g.query, g.documents) for g in load_dataset(WIKIQA)[:n]]


async def in_process(model_dir: str, reqs: list[tuple[str, list[str]]], conc: int) -> float:
    from encapure.engine import load_model
    from encapure.scheduler import Scheduler
    from encapure.settings import Settings

    settings = Settings()
    model = load_model(model_dir, settings=settings, name="rr")
    sched = Scheduler({"rr": model}, settings)
    await sched.start()
    sem = asyncio.Semaphore(conc)

    async def one(q: str, docs: list[str]) -> None:
        async with sem:
            p = await sched.prepare(model.prepare_pairs, q, docs)
            rows = await sched.submit("rr", p)
            model.finish(p, rows)

    await asyncio.gather(*(one(q, d) for q, d in reqs[:8]))  # warm
    t = time.perf_counter()
    await asyncio.gather(*(one(q, d) for q, d in reqs))
    dt = time.perf_counter() - t
    await sched.shutdown(5)
    return sum(len(d) for _, d in reqs) / dt


def plain_engine(model_dir: str, reqs: list[tuple[str, list[str]]]) -> float:
    """The engine alone, one request after another (its own length-sorted batching per request)."""
    from encapure.engine import load_model

    model = load_model(model_dir, name="rr")

    def one(q: str, docs: list[str]) -> None:
        p = model.prepare_pairs(q, docs)
        model.finish(p, model.forward(p.units))

    for q, d in reqs[:8]:
        one(q, d)
    t = time.perf_counter()
    for q, d in reqs:
        one(q, d)
    return sum(len(d) for _, d in reqs) / (time.perf_counter() - t)


async def over_http(url: str, reqs: list[tuple[str, list[str]]], conc: int) -> float:
    import aiohttp

    sem = asyncio.Semaphore(conc)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conc)) as s:

        async def one(q: str, docs: list[str]) -> None:
            async with sem, s.post(url + "/rerank", json={"query": q, "documents": docs}) as r:
                assert r.status == 200, await r.text()
                await r.read()

        await asyncio.gather(*(one(q, d) for q, d in reqs[:8]))
        t = time.perf_counter()
        await asyncio.gather(*(one(q, d) for q, d in reqs))
        dt = time.perf_counter() - t
    return sum(len(d) for _, d in reqs) / dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--questions", type=int, default=120)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--docs", type=int, default=0, help="cut each request to this many documents (0: all)")
    a = ap.parse_args()
    model_dir = a.model or sorted(glob.glob(str(ROOT / ".work" / "test-models" / "reranker-int8-*")))[0]
    reqs = load_requests(a.questions)
    if a.docs:
        reqs = [(q, d[: a.docs]) for q, d in reqs]
    print(f"model {model_dir}\n{len(reqs)} requests, {sum(len(d) for _, d in reqs)} pairs, concurrency {a.concurrency}")

    from encapure.server.testing import ServerProcess

    results: dict[str, list[float]] = {"engine, sequential": [], "in-process scheduler": [], "HTTP server": []}
    with ServerProcess(["--model", f"rr={model_dir}", "--log-level", "warning"]) as srv:
        for _ in range(a.rounds):
            results["engine, sequential"].append(plain_engine(model_dir, reqs))
            results["in-process scheduler"].append(asyncio.run(in_process(model_dir, reqs, a.concurrency)))
            results["HTTP server"].append(asyncio.run(over_http(srv.url, reqs, a.concurrency)))
    for k, v in results.items():
        print(f"{k:22s} " + "  ".join(f"{x:8.1f}" for x in v) + f"   best {max(v):8.1f} pairs/s")
    best = {k: max(v) for k, v in results.items()}
    print(f"ratio HTTP / in-process scheduler (best of each): {best['HTTP server'] / best['in-process scheduler']:.3f}")
    print(f"ratio HTTP / engine sequential (best of each):    {best['HTTP server'] / best['engine, sequential']:.3f}")


if __name__ == "__main__":
    main()

"""In-process baselines, each run in a child process so threads and imports do not leak between systems.

    python -m benchmarks.inproc --system engine|st --task rerank|embed --model PATH \
        --workload W.json --duration 5 --out R.json [--threads 2] [--max-length 256]

Two measurements per workload:
* bulk: every item of the workload in one call (the library's own batching decides) — the
  bare-engine limit a server on the same engine can approach;
* per-request: one call per request, sequentially (the latency a single client sees, no HTTP).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def _timed_repeat(fn: Callable[[], Any], min_s: float, max_reps: int = 50) -> tuple[list[float], Any]:
    times: list[float] = []
    out = None
    t_end = time.perf_counter() + min_s
    while len(times) < max_reps and (not times or time.perf_counter() < t_end):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--system", choices=["engine", "st"], required=True)
    p.add_argument("--task", choices=["rerank", "embed"], default="rerank")
    p.add_argument("--model", required=True)
    p.add_argument("--workload", type=Path, required=True)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=2,
                   help="the thread budget: torch threads for sentence-transformers; the engine's workers x "
                   "threads per worker (Encapure's default split: 2 single-thread workers for 2)")
    p.add_argument("--threads-per-worker", type=int, default=None,
                   help="engine only: override the split (e.g. 2 with 2 workers = 4 threads, oversubscribed)")
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--backend", default=None, help="engine only: encapure --backend (default: the library's, auto)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--bulk-items", type=int, default=800,
                   help="time bulk calls on the first requests holding about this many items (same for every system)")
    p.add_argument("--full-pass", action="store_true",
                   help="also score the whole workload once (for MAP / embeddings) — untimed")
    a = p.parse_args()

    wl: list[dict[str, Any]] = json.loads(a.workload.read_text())
    t_load = time.perf_counter()
    if a.system == "engine":
        from encapure.engine import Embedder, Reranker
        from encapure.settings import Settings

        # The same thread budget as the peers: Encapure's workers share it (threads per worker = budget /
        # workers, the library's default split on a 2-core machine), not a budget per worker, which
        # oversubscribed the cores twice over (2 workers x 2 threads on 2 cores).
        workers = Settings().workers
        per_worker = a.threads_per_worker or max(1, a.threads // workers)
        settings = Settings(workers=workers, threads_per_worker=per_worker,
                            **({"backend": a.backend} if a.backend else {}))
        layout = f"{settings.workers} workers x {settings.resolved_threads()} threads"
        if a.task == "rerank":
            rr = Reranker.from_pretrained(a.model, settings=settings)

            def bulk_fn(pairs: list[tuple[str, str]]) -> np.ndarray:
                return np.asarray(rr.score(pairs))

            def req_fn(q: str, docs: list[str]) -> np.ndarray:
                return np.asarray(rr.compute(q, docs).scores)
        else:
            em = Embedder.from_pretrained(a.model, settings=settings)

            def bulk_fn(pairs: list[tuple[str, str]]) -> np.ndarray:
                return np.asarray(em.embed([t for _, t in pairs]))

            def req_fn(q: str, docs: list[str]) -> np.ndarray:
                return np.asarray(em.embed(docs))
    else:
        import torch

        torch.set_num_threads(a.threads)
        layout = f"torch threads {a.threads}"
        if a.task == "rerank":
            from sentence_transformers import CrossEncoder

            ce = CrossEncoder(a.model, device="cpu", max_length=a.max_length)

            def bulk_fn(pairs: list[tuple[str, str]]) -> np.ndarray:
                return np.asarray(ce.predict(pairs, batch_size=32))

            def req_fn(q: str, docs: list[str]) -> np.ndarray:
                return np.asarray(ce.predict([(q, d) for d in docs], batch_size=32))
        else:
            from sentence_transformers import SentenceTransformer

            st = SentenceTransformer(a.model, device="cpu")

            def bulk_fn(pairs: list[tuple[str, str]]) -> np.ndarray:
                return np.asarray(st.encode([t for _, t in pairs], batch_size=32))

            def req_fn(q: str, docs: list[str]) -> np.ndarray:
                return np.asarray(st.encode(docs, batch_size=32))

    load_s = time.perf_counter() - t_load
    all_pairs = [(r.get("query") or "", t) for r in wl for t in r["texts"]]
    prefix: list[tuple[str, str]] = []
    for r in wl:
        if len(prefix) >= a.bulk_items:
            break
        prefix.extend((r.get("query") or "", t) for t in r["texts"])
    pairs = prefix
    # Warm-up on a slice, then the prefix as one call, repeated while time allows.
    bulk_fn(pairs[: min(64, len(pairs))])
    bulk_times, bulk_out = _timed_repeat(lambda: bulk_fn(pairs), a.duration / 2, max_reps=10)
    best = min(bulk_times)
    median = float(np.median(bulk_times))
    scores_by_key: dict[str, list[float]] = {}
    full_items_per_s = None
    if a.full_pass:
        t_full = time.perf_counter()
        bulk_out = bulk_fn(all_pairs)
        full_items_per_s = len(all_pairs) / (time.perf_counter() - t_full)
    if a.task == "rerank" and a.full_pass:
        flat = np.asarray(bulk_out).reshape(-1)
        pos = 0
        for r in wl:
            n = len(r["texts"])
            scores_by_key[str(r["key"])] = flat[pos : pos + n].astype(float).tolist()
            pos += n
    # Per-request, sequential.
    lat: list[float] = []
    t_end = time.perf_counter() + a.duration / 2
    i = 0
    while time.perf_counter() < t_end and i < 10 * len(wl):
        r = wl[i % len(wl)]
        t0 = time.perf_counter()
        req_fn(r.get("query") or "", r["texts"])
        lat.append(time.perf_counter() - t0)
        i += 1
    lat_a = np.array(lat)
    n_items_req = sum(len(wl[j % len(wl)]["texts"]) for j in range(i))
    result = {
        "system": a.system,
        "load_s": load_s,
        "items": len(pairs),
        "bulk_runs": len(bulk_times),
        "bulk_items_per_s": len(pairs) / median,
        "bulk_items_per_s_best": len(pairs) / best,
        "full_items_per_s": full_items_per_s,  # the whole workload in one call (same pairs as the servers)
        "seq_requests": i,
        "seq_items_per_s": n_items_req / float(lat_a.sum()) if i else None,
        "seq_p50_ms": float(np.percentile(lat_a, 50) * 1000) if i else None,
        "seq_p95_ms": float(np.percentile(lat_a, 95) * 1000) if i else None,
        "seq_p99_ms": float(np.percentile(lat_a, 99) * 1000) if i else None,
        "scores_by_key": scores_by_key,
        "embeddings_head": np.asarray(bulk_out)[:64].astype(float).tolist() if a.task == "embed" else None,
        "threads": a.threads,
        "layout": layout,
        "omp": os.environ.get("OMP_NUM_THREADS"),
    }
    a.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()

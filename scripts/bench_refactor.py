"""Before/after a refactor: two Encapure checkouts serving the SAME model folder, side by side.

Usage: python scripts/bench_refactor.py BEFORE_CHECKOUT MODEL_DIR [--cell-s 4] [--rounds 2] [--c 8 32]
Runs `encapure serve` from BEFORE_CHECKOUT (PYTHONPATH) and from this checkout, plus the naive
FastAPI + ORT server as a reference, on WikiQA-test-gold at each concurrency, alternating the systems
cell by cell so machine noise hits all of them alike; prints pairs/s and p50 per cell and the
after/before ratio. Compare ratios within one run.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import loadgen  # noqa: E402
from benchmarks.models import WIKIQA_TEST  # noqa: E402
from benchmarks.systems import ServerProcess, encapure_spec, naive_spec  # noqa: E402
from benchmarks.workloads import load_wikiqa  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("model", type=Path)
    ap.add_argument("--cell-s", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--c", type=int, nargs="+", default=[8, 32])
    args = ap.parse_args()
    before = encapure_spec(args.model, name="before", label="before")
    before.env = {"PYTHONPATH": str(args.before.resolve())}
    specs = [before, encapure_spec(args.model, name="after", label="after"), naive_spec(args.model)]
    wl = load_wikiqa(WIKIQA_TEST)
    servers = [ServerProcess(s) for s in specs]
    for s in servers:
        s.start()
    results: dict[tuple[str, int], list[dict[str, Any]]] = {}
    try:
        for _ in range(args.rounds):
            for c in args.c:
                for s in servers:
                    reqs = [s.spec.http_request(r) for r in wl.requests]
                    res = loadgen.run_closed(s.url, reqs, concurrency=c, max_requests=1_000_000,
                                             duration_s=args.cell_s, warmup_requests=c)
                    summ = loadgen.summarize(res)
                    results.setdefault((s.spec.name, c), []).append(summ)
    finally:
        for s in servers:
            s.stop()
    print(f"CPU: {'AVX-512 VNNI' if 'avx512_vnni' in Path('/proc/cpuinfo').read_text() else 'AVX2, no VNNI'}, "
          f"{os.cpu_count()} cores; cells of {args.cell_s:g} s, best of {args.rounds} rounds")
    print(f"{'system':10s} {'c':>4s} {'pairs/s':>9s} {'p50 ms':>8s} {'errors':>7s}")
    best: dict[tuple[str, int], float] = {}
    for (name, c), runs in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        top = max(runs, key=lambda r: r.get("items_per_s") or 0)
        best[(name, c)] = float(top.get("items_per_s") or 0)
        p50 = top.get("p50_ms") or float("nan")
        errs = sum(sum(r["errors"].values()) for r in runs)
        print(f"{name:10s} {c:4d} {best[(name, c)]:9.1f} {p50:8.1f} {errs:7d}")
    for c in args.c:
        b, a, n = best[("before", c)], best[("after", c)], best[("naive-rerank", c)]
        print(f"c={c}: after/before {a / b:.3f}; vs naive: before {b / n:.2f}x, after {a / n:.2f}x")


if __name__ == "__main__":
    main()

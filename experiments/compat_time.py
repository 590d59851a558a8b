"""Where ``encapure.compat.SentenceTransformer.encode`` spends its time on 1,000 mixed texts.

Usage::

    python experiments/compat_time.py FOLDER [FOLDER ...] [--reps 3] [--n 1000]

For each exported embedder folder (ONNX or OpenVINO IR), in one process, alternating, best of
``--reps``: tokenization alone; ``encode(texts, batch_size=32)`` as sentence-transformers users
call it; the engine's ``run_prepared`` on all units at once (no chunking) with the compat's bulk
settings and with others (batch size, workers x threads); and the time spent inside the runtime's
``run`` (summed over workers) vs the rest (feeds, padding, pooling, thread hand-offs).

Findings (2026-12-02, AMD EPYC AVX-512 VNNI, 2 cores shared, load average 6-8; best of 2, all-MiniLM-L6-v2
EXPORT_VERSION 9; 76,044 real tokens, 76,424 padded):
| case | ONNX int8 (shipped, attention-only static) s | OpenVINO IR int8 (NNCF static, FFN down f32) s |
|---|---|---|
| tokenization alone | 0.20 | 0.24 |
| compat ``encode(texts, batch_size=32)`` | 26.24 (run() 50.95 over 2 workers) | 17.67 (33.51) |
| engine ``run_prepared``, 2 workers x 1 thread, batches of 4 (no chunks) | 25.57 | 17.08 |
| engine, 1 worker x 2 threads, batches of 16 | 35.37 | 21.87 |
So >97% of the wall time is inside the runtime's ``run`` (2 workers busy), tokenization <1%, padding
0.5%, the compat's chunk-of-32 barrier ~3%: what is left is the model's arithmetic, which the
OpenVINO static int8 recipe cuts by 1.49x against the shipped ONNX int8.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments._common import WIKIQA  # noqa: E402


def texts(n: int) -> list[str]:
    from encapure.evaluation import load_dataset, mixed_texts

    groups = [g for p in (WIKIQA["test"], WIKIQA["dev"]) for g in load_dataset(p)]
    return list(mixed_texts(groups, n, np.random.default_rng(0)))


class Timed:
    """Wraps a backend session: sums the seconds spent in ``run`` (all calling threads together)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.seconds = 0.0
        self.calls = 0
        self._lock = threading.Lock()

    def get_inputs(self) -> Any:
        return self.inner.get_inputs()

    def get_outputs(self) -> Any:
        return self.inner.get_outputs()

    def run(self, names: Any, feed: Any) -> Any:
        t0 = time.perf_counter()
        out = self.inner.run(names, feed)
        dt = time.perf_counter() - t0
        with self._lock:
            self.seconds += dt
            self.calls += 1
        return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--configs", default="w2t1b4,w2t1b8,w2t1b16,w1t2b4,w1t2b16,w2t1b2")
    args = ap.parse_args()
    from encapure.compat import SentenceTransformer
    from encapure.settings import Settings

    data = texts(args.n)
    cases: dict[str, tuple[Any, Any]] = {}  # label -> (callable, timed session)
    for folder in args.folders:
        tag = Path(folder).name[:24]
        st = SentenceTransformer(folder)  # the compat defaults (bulk settings)
        timed = Timed(st.model.session)
        st.model.session = timed
        prepared = st.model.prepare_texts(data)
        cases[f"{tag} tokenize"] = (lambda m=st.model: m.prepare_texts(data), None)
        cases[f"{tag} compat encode bs32"] = (lambda s=st: s.encode(data, batch_size=32), timed)
        for cfg in [c for c in args.configs.split(",") if c]:
            w, t, b = (int(x) for x in cfg[1:].replace("t", " ").replace("b", " ").split())
            s = Settings(workers=w, threads_per_worker=t, max_batch_size=b)
            emb = SentenceTransformer(folder, settings=s)
            tm = Timed(emb.model.session)
            emb.model.session = tm
            cases[f"{tag} engine {cfg}"] = (lambda m=emb.model, p=prepared: m.run_prepared(p), tm)
    for fn, _ in cases.values():
        fn()  # warm-up
    best: dict[str, tuple[float, float, int]] = {}
    for rep in range(args.reps):
        order = list(cases) if rep % 2 == 0 else list(cases)[::-1]
        for k in order:
            fn, tm = cases[k]
            if tm is not None:
                tm.seconds, tm.calls = 0.0, 0
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            inside = tm.seconds if tm is not None else 0.0
            calls = tm.calls if tm is not None else 0
            if k not in best or dt < best[k][0]:
                best[k] = (dt, inside, calls)
    load = os.getloadavg()
    print(f"\n{args.n} texts, best of {args.reps}, load avg {load[0]:.2f}/{load[1]:.2f}\n")
    print("| case | wall s | runtime run() s (all workers) | batches |")
    print("|---|---|---|---|")
    for k, (dt, inside, calls) in best.items():
        print(f"| {k} | {dt:.2f} | {inside:.2f} | {calls} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

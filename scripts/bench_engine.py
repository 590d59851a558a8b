#!/usr/bin/env python
"""Engine throughput and quality, side by side, in one process (not a timed test).

Systems, all on the same data and the same thread count:
- ``st``          sentence-transformers CrossEncoder (PyTorch fp32), batch 32, input order
- ``ort-naive``   plain ONNX Runtime on our fp32 export, fixed batches of 32 in input order,
                  padded to each batch's longest item (what a straightforward integration does)
- ``ort-naive-int8`` the same on the int8 export (isolates batching from quantization)
- ``engine-fp32`` / ``engine-int8`` / ``engine-int4``: this engine (length-sorted token-budget batches)

Workloads: WikiQA-test-gold (2,351 mixed-length pairs) and a synthetic wide length spread.
Sections (default all): ``wikiqa``, ``spread``, ``threads`` (N single-thread workers vs one
N-thread run), ``bge`` (full-size bge-reranker-v2-m3 architecture, random weights, int8).

Timings alternate systems round by round and keep each system's best round, so a busy neighbour
on a shared machine hurts every system alike. Usage::

    python scripts/bench_engine.py [--threads 2] [--rounds 2] [--sections wikiqa,spread,threads,bge]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from encapure.evaluation import QueryGroup, evaluate_flat, load_dataset, text_pool
from encapure.evaluation import pairs as pairs_of

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ENCAPURE_SHARED", ROOT.parent / "shared"))
FIXTURE = SHARED / "models" / "minilm-l6-wikiqa-reranker"
BGE_ARCH = SHARED / "models" / "bge-reranker-v2-m3-arch"
WIKIQA = SHARED / "data" / "wikiqa" / "WikiQA-test-gold.tsv"
WORK = ROOT / ".work" / "bench-models"

Pairs = list[tuple[str, str]]
Scorer = Callable[[Pairs], np.ndarray]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def export_cached(name: str, build: Callable[[Path], object]) -> Path:
    from encapure.hub import cached_build

    return cached_build(WORK, name, build)


def fixture_export(precision: str) -> Path:
    from encapure.export import export_model

    def build(out: Path) -> None:
        log(f"exporting the reranker fixture at {precision} ...")
        export_model(FIXTURE, out, precision=precision)

    from encapure.export import EXPORT_VERSION

    # The exporter's version is in the name so a new quantization recipe is re-exported, not reused.
    return export_cached(f"minilm-wikiqa-{precision}-v{EXPORT_VERSION}", build)


# --- systems ----------------------------------------------------------------------------------
def st_scorer(threads: int) -> Scorer:
    import torch
    from sentence_transformers import CrossEncoder

    torch.set_num_threads(threads)
    ce = CrossEncoder(str(FIXTURE), max_length=256, device="cpu")

    def score(pairs: Pairs) -> np.ndarray:
        with torch.inference_mode():
            return np.asarray(ce.predict(pairs, batch_size=32, show_progress_bar=False,
                                         activation_fn=torch.nn.Identity()), dtype=np.float32)

    return score


def naive_scorer(folder: Path, threads: int, batch_size: int = 32) -> Scorer:
    """What most integrations do: tokenizer padding per batch, batches in input order."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.enable_truncation(256, strategy="longest_first")
    tok.enable_padding()

    def score(pairs: Pairs) -> np.ndarray:
        out = []
        for i in range(0, len(pairs), batch_size):
            encs = tok.encode_batch(pairs[i : i + batch_size])
            feed = {"input_ids": np.array([e.ids for e in encs], dtype=np.int64),
                    "attention_mask": np.array([e.attention_mask for e in encs], dtype=np.int64)}
            if "token_type_ids" in names:
                feed["token_type_ids"] = np.array([e.type_ids for e in encs], dtype=np.int64)
            out.append(sess.run(None, feed)[0][:, 0])
        return np.concatenate(out).astype(np.float32)

    return score


def engine_scorer(folder: Path, threads: int, workers: int = 1, **settings_kw: Any) -> Scorer:
    from encapure.engine import Reranker
    from encapure.settings import Settings

    r = Reranker.from_pretrained(folder, settings=Settings(threads_per_worker=threads, workers=workers,
                                                           **settings_kw))

    def score(pairs: Pairs) -> np.ndarray:
        return r.score(pairs, raw_scores=True)

    return score


# --- workloads --------------------------------------------------------------------------------
def wikiqa() -> tuple[Pairs, list[QueryGroup]]:
    groups = load_dataset(WIKIQA)
    return pairs_of(groups), groups


def wide_spread(n: int = 1024, seed: int = 0) -> Pairs:
    """Pairs whose lengths span ~15 to 256 tokens in random order (60% short, 25% mid, 15% long)."""
    questions, sentences = text_pool(load_dataset(WIKIQA))
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        u = rng.random()
        k = 1 if u < 0.6 else (rng.randint(3, 5) if u < 0.85 else rng.randint(12, 20))
        pairs.append((rng.choice(questions), " ".join(rng.sample(sentences, k))))
    return pairs


def mean_ap(groups: list[QueryGroup], scores: np.ndarray) -> float:
    return evaluate_flat([g.labels for g in groups], scores).map


def race(systems: dict[str, Scorer], pairs: Pairs, rounds: int) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Best seconds per system over ``rounds`` alternating rounds (after one untimed warm-up call)."""
    best = {k: float("inf") for k in systems}
    scores: dict[str, np.ndarray] = {}
    for fn in systems.values():
        fn(pairs[:64])
    for r in range(rounds):
        order = list(systems) if r % 2 == 0 else list(reversed(systems))
        for name in order:
            t0 = time.perf_counter()
            scores[name] = systems[name](pairs)
            dt = time.perf_counter() - t0
            best[name] = min(best[name], dt)
            log(f"  round {r + 1} {name:16s} {len(pairs) / dt:8.1f} pairs/s")
    return best, scores


# --- sections ---------------------------------------------------------------------------------
def section_wikiqa(args: argparse.Namespace, results: dict) -> None:
    pairs, groups = wikiqa()
    f32, i8 = fixture_export("fp32"), fixture_export("int8")
    systems: dict[str, Scorer] = {
        "st": st_scorer(args.threads),
        "ort-naive": naive_scorer(f32, args.threads),
        "ort-naive-int8": naive_scorer(i8, args.threads),
        "engine-fp32": engine_scorer(f32, args.threads),
        "engine-int8": engine_scorer(i8, args.threads),
    }
    try:
        systems["engine-int4"] = engine_scorer(fixture_export("int4"), args.threads)
    except Exception as e:  # int4 export may be unavailable
        log(f"int4 export unavailable: {e}")
    log(f"WikiQA-test-gold: {len(pairs)} pairs, {args.threads} threads")
    best, scores = race(systems, pairs, args.rounds)
    st_rate = len(pairs) / best["st"]
    st_map = mean_ap(groups, scores["st"])
    rows = {}
    for name in systems:
        rate = len(pairs) / best[name]
        m = mean_ap(groups, scores[name])
        rows[name] = {"pairs_per_s": round(rate, 1), "x_st": round(rate / st_rate, 2), "MAP": round(m, 4),
                      "MAP_vs_st": round(m / st_map, 4)}
    results["wikiqa"] = rows
    print(f"\n== WikiQA-test-gold ({len(pairs)} pairs, {args.threads} threads, best of {args.rounds}) ==")
    print(f"{'system':16s} {'pairs/s':>9s} {'x ST':>6s} {'MAP':>7s} {'MAP/ST':>7s}")
    for name, r in rows.items():
        print(f"{name:16s} {r['pairs_per_s']:9.1f} {r['x_st']:6.2f} {r['MAP']:7.4f} {r['MAP_vs_st']:7.4f}")


def section_spread(args: argparse.Namespace, results: dict) -> None:
    pairs = wide_spread()
    i8 = fixture_export("int8")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(i8 / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(256)
    lens = np.array([len(e.ids) for e in tok.encode_batch(pairs)])
    systems = {
        "ort-naive-int8": naive_scorer(i8, args.threads),
        "engine-int8": engine_scorer(i8, args.threads),
    }
    log(f"wide spread: {len(pairs)} pairs, tokens p10/p50/p90/max = "
        f"{np.percentile(lens, 10):.0f}/{np.percentile(lens, 50):.0f}/{np.percentile(lens, 90):.0f}/{lens.max()}")
    best, scores = race(systems, pairs, args.rounds)
    diff = float(np.abs(scores["ort-naive-int8"] - scores["engine-int8"]).max())
    ratio = best["ort-naive-int8"] / best["engine-int8"]
    results["spread"] = {"pairs": len(pairs), "naive_pairs_per_s": round(len(pairs) / best["ort-naive-int8"], 1),
                         "engine_pairs_per_s": round(len(pairs) / best["engine-int8"], 1),
                         "speedup": round(ratio, 2), "max_abs_score_diff": diff,
                         "tokens_p10_p50_p90_max": [int(np.percentile(lens, q)) for q in (10, 50, 90)] + [int(lens.max())]}
    print(f"\n== wide length spread ({len(pairs)} pairs, int8, {args.threads} threads) ==")
    print(f"naive fixed batches of 32 : {len(pairs) / best['ort-naive-int8']:8.1f} pairs/s")
    print(f"length-sorted token budget: {len(pairs) / best['engine-int8']:8.1f} pairs/s  ({ratio:.2f}x; "
          f"max |score diff| {diff:.2e})")


def section_threads(args: argparse.Namespace, results: dict) -> None:
    """N single-thread workers sharing one session vs one run with N intra-op threads."""
    pairs, _ = wikiqa()
    i8 = fixture_export("int8")
    n = args.threads
    systems = {
        f"1 worker x {n} threads": engine_scorer(i8, n, workers=1),
        f"{n} workers x 1 thread": engine_scorer(i8, 1, workers=n),
    }
    # Many small requests: the server's typical load (16 docs each, one request at a time per worker).
    small = [pairs[i : i + 16] for i in range(0, 1024, 16)]

    def requests(fn: Scorer) -> Scorer:
        def run(_: Pairs) -> np.ndarray:
            return np.concatenate([fn(p) for p in small])
        return run

    log("threads: whole-dataset calls")
    best, _ = race(systems, pairs, args.rounds)
    log("threads: 16-pair requests, sequential")
    best_small, _ = race({k: requests(v) for k, v in systems.items()}, pairs[:1024], args.rounds)
    results["workers_vs_threads"] = {k: {"bulk_pairs_per_s": round(len(pairs) / best[k], 1),
                              "small_requests_pairs_per_s": round(1024 / best_small[k], 1)} for k in systems}
    print(f"\n== workers vs threads (int8, WikiQA; {n} cores) ==")
    for k, v in results["workers_vs_threads"].items():
        print(f"{k:24s} bulk {v['bulk_pairs_per_s']:8.1f} pairs/s   16-pair requests "
              f"{v['small_requests_pairs_per_s']:8.1f} pairs/s")


def bge_export() -> Path:
    def build(out: Path) -> None:
        import torch
        from transformers import AutoConfig, AutoTokenizer, XLMRobertaForSequenceClassification

        from encapure.export import export_model

        log("building the full-size bge-reranker-v2-m3 architecture with random weights and exporting int8 "
            "(several minutes) ...")
        config = AutoConfig.from_pretrained(str(BGE_ARCH))
        torch.manual_seed(0)
        model = XLMRobertaForSequenceClassification(config).eval()
        export_model(model, out, precision="int8", tokenizer=AutoTokenizer.from_pretrained(str(BGE_ARCH)),
                     max_length=512)

    from encapure.export import EXPORT_VERSION

    return export_cached(f"bge-reranker-v2-m3-arch-int8-v{EXPORT_VERSION}", build)


def section_bge(args: argparse.Namespace, results: dict) -> None:
    from encapure.engine import Reranker
    from encapure.settings import Settings

    folder = args.bge_model or bge_export()
    t0 = time.perf_counter()
    r = Reranker.from_pretrained(folder, settings=Settings(threads_per_worker=args.threads))
    load_s = time.perf_counter() - t0
    tok = r.model._tokenizer("raw")
    query = "what is the population of berlin"
    lat = {}
    for total in (32, 64, 128):
        # Grow a document word by word until the pair is exactly ``total`` tokens long.
        words = ["the", "city", "has", "many", "people", "and", "a", "long", "history", "of", "trade", "and", "art"]
        doc, k = "", 0
        while True:
            cand = (doc + " " + words[k % len(words)]).strip()
            n = len(tok.encode(query, cand).ids)
            if n > total:
                break
            doc, k = cand, k + 1
        p = r.model.prepare_pairs(query, [doc] * 8)
        assert all(len(u) == total for u in p.units), [len(u) for u in p.units]
        times = []
        for _ in range(max(3, args.rounds * 2)):
            t = time.perf_counter()
            r.rerank(query, [doc] * 8)
            times.append(time.perf_counter() - t)
        lat[total] = {"median_ms": round(1000 * float(np.median(times)), 1), "min_ms": round(1000 * min(times), 1)}
        log(f"  8 pairs x {total} tokens: median {lat[total]['median_ms']} ms")
    pairs, _ = wikiqa()
    sample = pairs[:256]
    best, _ = race({"bge-int8": lambda p: r.score(p, raw_scores=True)}, sample, 1)
    results["bge"] = {"load_s": round(load_s, 2), "latency_8_pairs": lat,
                      "wikiqa_256_pairs_per_s": round(len(sample) / best["bge-int8"], 1),
                      "model_mb": round(sum(f.stat().st_size for f in folder.iterdir()) / 2**20, 1)}
    print(f"\n== bge-reranker-v2-m3 architecture, random weights, int8 ({args.threads} threads) ==")
    print(f"load {load_s:.2f} s, files {results['bge']['model_mb']} MB")
    for total, v in lat.items():
        print(f"8 pairs x {total:3d} tokens: {v['median_ms']:7.1f} ms median ({v['min_ms']} min)")
    print(f"WikiQA first 256 pairs: {results['bge']['wikiqa_256_pairs_per_s']} pairs/s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--sections", default="wikiqa,spread,threads,bge")
    ap.add_argument("--bge-model", type=Path, default=None,
                    help="an existing int8 export of the bge-reranker-v2-m3 architecture (skips the export, "
                         "which needs ~11 GB of RAM)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    results: dict = {"threads": args.threads, "cpu_count": os.cpu_count(),
                     "loadavg_start": os.getloadavg()}
    sections = {"wikiqa": section_wikiqa, "spread": section_spread, "threads": section_threads, "bge": section_bge}
    for name in args.sections.split(","):
        sections[name.strip()](args, results)
    results["loadavg_end"] = os.getloadavg()
    print(f"\nload average at start {results['loadavg_start']}, at end {results['loadavg_end']} "
          "(a shared machine inflates every number alike)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Per-token (row-wise) dynamic int8 vs the shipped static int8 vs fp32, on ONNX Runtime.

Why: ONNX Runtime's dynamic int8 computes one activation scale per MatMul input over the whole
batch, so a row's result moves with its batch-mates; the shipped static int8 is batch-invariant
but its per-tensor calibrated scales cost the embedder's FFN down projection its accuracy (all
MatMuls int8: worst cosine 0.97 vs sentence-transformers). ``encapure.export.quantize.
quantize_int8_per_token`` gives every row (token) its own scale at run time: batch-invariant by
construction, and far finer than one scale per tensor. Weights are per-channel 7-bit so the u8 x s8
product is exact on AVX2 (VPMADDUBSW) and AVX-512 VNNI alike.

Usage: python experiments/int8_per_token.py [embed|rerank|both] [--rounds 3] [--pairs 1000]
       [--models DIR] [--cands a,b]
``--models``: the folder of exported test models (default .work/test-models of this checkout, else
ENCAPURE_TEST_MODELS); it must hold the fp32 and the default int8 export of the embedder
(all-MiniLM-L6-v2) and the reranker fixture at the current EXPORT_VERSION (the test suite makes
them). Candidates are built under .work/int8-per-token/.

Prints, per model: min/mean cosine to sentence-transformers on the 304 texts of
tests/test_engine_embed.py (embedder) or WikiQA-test-gold MAP with length-sorted batches of 32 and
with one batch per query (reranker); the max |delta| of a row alone vs in a batch with 40 other
rows at random places vs padded to 256 tokens; items/s at 2 threads on 1,000 mixed texts
(``encapure.evaluation.mixed_texts``) or 1,000 WikiQA pairs, all models alternated in one process
(a shared machine: compare ratios within one run); and the median latency of one item per run.

Findings (2026-12-02, AMD EPYC with AVX-512 VNNI, 2 cores, load average 8-16 from other jobs, so
speed is ratios of alternated passes only). Embedder speed: the full run (1,000 texts, load ~10) gave
x fp32 / x static 1.74 / 1.51 for pt-w7, 1.28 / 1.10 FFN-down fp32, 1.57 / 1.35 SmoothQuant, 1.68 / 1.45
pt-w8, 1.55 / 1.34 no offset; the columns below are a shorter alternated run (300 texts; reranker 500
pairs, run separately for time), best of 3:
| embedder (304 texts vs sentence-transformers) | min cos | mean cos | alone vs batched | x fp32 | x static |
|---|---|---|---|---|---|
| static, shipped (attention int8, FFN fp32) | 0.9934 | 0.9967 | 0.0 | 1.12 | 1.00 |
| pt-w7: every MatMul per-token, 7-bit weights, GELU offset | 0.9914 | 0.9958 | 0.0 | 1.92 | 1.72 |
| pt-w7 without the GELU offset | 0.9909 | 0.9956 | 0.0 | | |
| pt-w8 (8-bit weights: NOT exact on AVX2) | 0.9916 | 0.9973 | 0.0 | | |
| pt-a7w8 (7-bit activations, 8-bit weights) | 0.9798 | 0.9950 | 0.0 | | |
| pt-w7, FFN down in fp32 | 0.9937 | 0.9967 | 0.0 | 1.54 | 1.38 |
| pt-w7 after SmoothQuant 0.5 on Q/K/V and FFN-up inputs | 0.9945 | 0.9978 | 0.0 | | |
Reranker fixture, WikiQA-test-gold MAP (fp32 0.6783): static shipped 0.6766 (99.75%); pt-w7 + int8
word table 0.6795 (100.18%) with corpus batches and per-query batches alike, alone vs batched 0.0;
2.67x fp32 and 2.03x static pairs/s.
Across ISAs (12 texts, same process code, native AVX-512 VNNI vs ``qemu-x86_64 -cpu EPYC-Rome``): pooled
embeddings of pt-w7 differed (cosine >= 0.9994, max |d| 6.3e-3), pt-w8 more (0.9959: AVX2 saturation),
shipped static and fp32 identical / 1e-7. So per-token is batch-invariant but not yet CPU-independent.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a file: experiments/ is a package of ROOT
sys.path.insert(0, str(ROOT / "tests"))

from encapure.evaluation import mixed_texts, pairs  # noqa: E402
from encapure.export import quantize as qz  # noqa: E402
from experiments._common import (  # noqa: E402
    WORK,
    feed,
    length_batches,
    run_rows,
    session,
    tokenizer,
    wikiqa,
    wikiqa_map,
)

OUT = WORK / "int8-per-token"


def candidates(task: str) -> dict[str, dict[str, Any]]:
    """name -> quantize_int8_per_token recipe (+ ``gather``: word-embedding table in int8 as well)."""
    c: dict[str, dict[str, Any]] = {
        "pt-w7": {"weight_bits": 7},
        "pt-w7-nooffset": {"weight_bits": 7, "gelu_offset": False},
        "pt-w8": {"weight_bits": 8},  # exact on VNNI only (AVX2 may saturate): accuracy reference
        "pt-a7w8": {"weight_bits": 8, "activation_bits": 7},  # the other split that fits AVX2's int16
        "pt-w7-xffndown": {"weight_bits": 7, "exclude": [qz.FFN_OUT]},
        # SmoothQuant (experiments/int8_smoothquant.py, calibrated on the shipped set) on the
        # LayerNorm outputs feeding Q/K/V and the FFN up projection, then per-token
        "pt-w7-sq.5": {"weight_bits": 7, "smooth": ([r"attention/self/(query|key|value)/MatMul", qz.FFN_UP], 0.5)},
    }
    if task == "rerank":
        c["pt-w7+emb"] = {"weight_bits": 7, "gather": True}
    return c


def export_version() -> str:
    from encapure.export import EXPORT_VERSION

    return str(EXPORT_VERSION)


def exported(models: Path, kind: str, precision: str) -> Path:
    dirs = []
    for d in models.glob(f"{kind}-{precision}-*"):
        m = d / "encapure.json"
        if m.is_file() and json.loads(m.read_text())["tool_versions"].get("export_version") == export_version():
            dirs.append(d)
    if not dirs:
        sys.exit(f"no {kind} {precision} export at EXPORT_VERSION {export_version()} under {models} "
                 "(run the test suite once, or pass --models)")
    return max(dirs, key=lambda d: d.stat().st_mtime)


def build(src: Path, name: str, recipe: dict[str, Any]) -> Path:
    out = OUT / f"{src.parent.name.split('-')[0]}-{name}.onnx"
    if out.exists() and not os.environ.get("REBUILD"):
        return out
    OUT.mkdir(parents=True, exist_ok=True)
    r = dict(recipe)
    gather = r.pop("gather", False)
    smooth = r.pop("smooth", None)
    target = out.with_name(out.name + ".mm") if gather else out
    t0 = time.perf_counter()
    if smooth is not None:
        from tokenizers import Tokenizer

        from encapure.export import calibration as cal
        from experiments.int8_smoothquant import smooth_activations

        folder = src.parent
        task = json.loads((folder / "encapure.json").read_text())["task"]
        feeds = cal.feeds(Tokenizer.from_file(str(folder / "tokenizer.json")), cal.load_items(None, task),
                          ["input_ids", "attention_mask", "token_type_ids"], 256, 0)
        smoothed = out.with_name(out.name + ".smooth.onnx")
        smooth_activations(src, smoothed, smooth[0], feeds, smooth[1])
        src = smoothed
    rec = qz.quantize_int8_per_token(src, target, {"method": "per-token", **r})
    if gather:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        g = onnx.load(str(target), load_external_data=False)
        tables = [n.name for n in g.graph.node if n.op_type == "Gather" and qz._is_word_table(n.name)]
        with qz.quiet_logs():
            quantize_dynamic(str(target), str(out), weight_type=QuantType.QInt8, op_types_to_quantize=["Gather"],
                             nodes_to_quantize=tables, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        target.unlink()
    print(f"built {out.name} in {time.perf_counter() - t0:.1f}s: {rec['quantized_matmuls']} MatMuls, "
          f"{rec['gelu_offset_matmuls']} with the GELU offset, {out.stat().st_size / 1e6:.1f} MB", flush=True)
    return out


def optimized_ops(path: Path) -> dict[str, int]:
    """What ORT made of the graph (ORT_ENABLE_ALL): the int8 kernels and the quantization ops left."""
    import onnx
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    o.optimized_model_filepath = str(OUT / "opt.onnx")
    o.log_severity_level = 3
    ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])
    m = onnx.load(o.optimized_model_filepath, load_external_data=False)
    Path(o.optimized_model_filepath).unlink()
    c = collections.Counter(n.op_type for n in m.graph.node)
    keep = ("MatMul", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QuantizeLinear",
            "DequantizeLinear", "ReduceMax", "Abs", "FusedMatMul", "QGemm")
    return {k: v for k, v in sorted(c.items()) if k in keep}


def invariance(sess: Any, encs: list[Any], others: list[Any], embed: bool) -> float:
    """Max |delta| of each item's output alone vs (a) all in one batch, (b) mixed at random places
    into ``others``, (c) alone but padded to 256 tokens."""
    n = len(encs)
    alone = run_rows(sess, [(np.array([i]), feed([e])) for i, e in enumerate(encs)], n, embed)
    rng = np.random.default_rng(1)
    worst = 0.0
    for order in [list(range(n))] + [list(rng.permutation(n + len(others))) for _ in range(3)]:
        batch = [encs[i] if i < n else others[i - n] for i in order]
        out = run_rows(sess, [(np.arange(len(batch)), feed(batch))], len(batch), embed)
        for pos, i in enumerate(order):
            if i < n:
                worst = max(worst, float(np.abs(out[pos] - alone[i]).max()))
    padded = run_rows(sess, [(np.array([i]), feed([e], pad_to=256)) for i, e in enumerate(encs)], n, embed)
    return max(worst, float(np.abs(padded - alone).max()))


def speed(paths: dict[str, Path], batches: list[Any], n: int, embed: bool, rounds: int) -> dict[str, float]:
    """Best items/s of ``rounds`` alternated passes per model (2 threads)."""
    sessions = {k: session(p, 2) for k, p in paths.items()}
    for s in sessions.values():
        run_rows(s, batches[:3], n, embed)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            run_rows(s, batches, n, embed)
            times[k].append(time.perf_counter() - t0)
    return {k: n / min(v) for k, v in times.items()}


def latency(paths: dict[str, Path], singles: list[Any], embed: bool) -> dict[str, float]:
    """Median ms of one item per run (the light-load case), models alternated item by item."""
    sessions = {k: session(p, 2) for k, p in paths.items()}
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for e in singles:
        for k, s in sessions.items():
            t0 = time.perf_counter()
            run_rows(s, [(np.array([0]), feed([e]))], 1, embed)
            times[k].append(time.perf_counter() - t0)
    return {k: 1000 * float(np.median(v)) for k, v in times.items()}


def st_reference(texts: list[str]) -> np.ndarray:
    cache = OUT / "st-304.npy"
    if cache.exists():
        return np.load(cache)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    from benchmarks.models import embedder_source

    st = SentenceTransformer(str(embedder_source()), device="cpu")
    ref = np.asarray(st.encode(texts, batch_size=32, normalize_embeddings=True), np.float32)
    OUT.mkdir(parents=True, exist_ok=True)
    np.save(cache, ref)
    return ref


def run_task(task: str, models: Path, rounds: int, n_pairs: int, only: list[str] | None) -> None:
    embed = task == "embed"
    kind = "embedder" if embed else "reranker"
    fp32 = exported(models, kind, "fp32")
    static = exported(models, kind, "int8")
    q = json.loads((static / "encapure.json").read_text())["quantization"]
    print(f"\n=== {task}: fp32 {fp32.name}, shipped int8 {static.name} ({q.get('name')})", flush=True)
    paths = {"fp32": fp32 / "model.onnx", "static (shipped)": static / "model.onnx"}
    for name, recipe in candidates(task).items():
        if only is None or name in only:
            paths[name] = build(fp32 / "model.onnx", name, recipe)
    max_len = json.loads((fp32 / "encapure.json").read_text())["max_length"]
    rng = np.random.default_rng(0)
    rows: dict[str, dict[str, Any]] = {k: {} for k in paths}
    if embed:
        from test_engine_embed import _mixed_texts

        texts = _mixed_texts()
        ref = st_reference(texts)
        tok = tokenizer(fp32, max_len)
        encs = tok.encode_batch(texts)
        acc_batches = length_batches(encs, 32)
        bench = tok.encode_batch(mixed_texts(wikiqa("test") + wikiqa("dev"), 1000, rng))  # as bench_compat.py
        inv_items, others = [encs[i] for i in range(0, len(encs), 16)], bench[:40]
        for k, p in paths.items():
            s = session(p, 2)
            e = run_rows(s, acc_batches, len(encs), True)
            cos = (e * ref).sum(1)
            rows[k].update(min_cos=float(cos.min()), mean_cos=float(cos.mean()),
                           inv=invariance(s, inv_items, others, True))
            print(f"  {k}: {rows[k]}", flush=True)
    else:
        tok = tokenizer(fp32, max_len)
        groups = wikiqa("test")
        all_pairs = pairs(groups)
        encs = tok.encode_batch(all_pairs)
        by_query: list[Any] = []
        start = 0
        for g in groups:
            idx = np.arange(start, start + len(g.documents))
            by_query.append((idx, feed([encs[i] for i in idx])))
            start += len(g.documents)
        pick = rng.permutation(len(encs))
        bench = [encs[i] for i in pick[:n_pairs]]
        inv_items, others = [encs[i] for i in pick[-20:]], [encs[i] for i in pick[-60:-20]]
        for k, p in paths.items():
            s = session(p, 2)
            rows[k].update(map=wikiqa_map(groups, run_rows(s, length_batches(encs, 32), len(encs), False)),
                           map_q=wikiqa_map(groups, run_rows(s, by_query, len(encs), False)),
                           inv=invariance(s, inv_items, others, False))
            print(f"  {k}: {rows[k]}", flush=True)
    sp = speed(paths, length_batches(bench, 16), len(bench), embed, rounds)
    lat = latency(paths, bench[:60], embed)
    load = os.getloadavg()
    unit = "texts/s" if embed else "pairs/s"
    print(f"\n{task}: {unit} = best of {rounds} alternated passes, {len(bench)} items, batches of 16 by length, "
          f"2 threads; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {cpu()}")
    if embed:
        print(f"| model | min cos vs ST | mean cos | alone vs batched max abs d | {unit} | x fp32 | x static "
              "| 1 item p50 ms |")
    else:
        print(f"| model | MAP (batches of 32) | % fp32 | MAP (per query) | % fp32 | alone vs batched max abs d "
              f"| {unit} | x fp32 | x static | 1 item p50 ms |")
    print("|---" * (8 if embed else 10) + "|")
    f, st = sp["fp32"], sp["static (shipped)"]
    for k, r in rows.items():
        quality = (f"{r['min_cos']:.4f} | {r['mean_cos']:.4f}" if embed else
                   f"{r['map']:.4f} | {100 * r['map'] / rows['fp32']['map']:.2f}% | {r['map_q']:.4f} | "
                   f"{100 * r['map_q'] / rows['fp32']['map_q']:.2f}%")
        print(f"| {k} | {quality} | {r['inv']:.1e} | {sp[k]:.1f} | {sp[k] / f:.2f} | {sp[k] / st:.2f} "
              f"| {lat[k]:.1f} |")
    print("ORT's optimized graphs:")
    for k, p in paths.items():
        print(f"  {k}: {p.stat().st_size / 1e6:.1f} MB, {optimized_ops(p)}")


def cpu() -> str:
    try:
        info = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return "CPU unknown"
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("Model name")), "?")
    flags = next((ln for ln in info.splitlines() if ln.startswith("Flags")), "")
    isa = [f for f in ("avx512_vnni", "avx_vnni", "avx512f", "avx2") if f" {f}" in flags]
    return f"{name} ({', '.join(isa) or 'no AVX2'})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("task", nargs="?", choices=["rerank", "embed", "both"], default="both")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=1000, help="WikiQA pairs in the reranker speed run")
    ap.add_argument("--models", type=Path,
                    default=Path(os.environ.get("ENCAPURE_TEST_MODELS", ROOT / ".work" / "test-models")))
    ap.add_argument("--cands", default=None, help="comma-separated candidate names (default: all)")
    args = ap.parse_args()
    only = args.cands.split(",") if args.cands else None
    for t in (["embed", "rerank"] if args.task == "both" else [args.task]):
        run_task(t, args.models, args.rounds, args.pairs, only)


if __name__ == "__main__":
    main()

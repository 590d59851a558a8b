"""Batch-invariant INT8: static (calibrated) quantization vs dynamic int8 vs fp32.

Why: dynamic int8 (DynamicQuantizeLinear) computes ONE activation scale per tensor at run time over
the whole [batch, seq, hidden] tensor, so a pair's score depends on the other requests batched with
it (and on padding). With static quantization the activation scales are constants fixed at export
time from calibration data: quantizing an element then depends on that element only, the integer
GEMM is exact, so a row's result does not depend on the rest of the batch.

Usage: python experiments/int8_static_experiment.py [rerank|embed|both] [--quick]
Builds candidates in /tmp/int8exp/, then prints, per model: batch-invariance max |delta|
(alone vs in a padded batch), WikiQA-test-gold MAP (reranker) or min/mean cosine vs fp32 ONNX
(embedder), and pairs|texts/s at 1 and 2 threads with all candidates alternated in one process
(the machine may be shared: compare ratios within one run, not absolutes across runs).
Calibration uses WikiQA-dev (never the evaluation set). CANDS=a,b limits the candidates;
REBUILD=1 rebuilds models already in /tmp/int8exp. Histogram calibrators (Percentile/Entropy) fail in
ORT 1.31 on variable-length calibration batches (they stack tensors), hence MinMax (+moving average).

Findings (2026-11-22, shared 2-core AVX2 machine, --quick): every static candidate is batch-invariant
(max |delta| 0.0 alone vs batched vs padded to 256; dynamic int8: 0.81 logits / 0.022 cosine).
Reranker, recommended ``st-minmax-xffn-fo`` (= quantize_int8_static defaults): WikiQA MAP 99.94% of
fp32, 1.71x fp32 at 1 thread, 1.20x at 2 (dynamic: 1.85x / 1.41x). Embedder (all-MiniLM-L6-v2): best
static min cosine 0.9876 (mean 0.993) < 0.99; dynamic mixed recipe 0.9938.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: experiments/ is a package of ROOT

from encapure.evaluation import mixed_texts, pairs
from experiments._common import (
    RERANKER_FIXTURE,
    ROOT,
    feed,
    length_batches,
    run_rows,
    session,
    tokenizer,
    wikiqa,
    wikiqa_map,
)

RERANK_REF = RERANKER_FIXTURE / "scores_reference.json"
MODELS = ROOT / ".work" / "test-models"
WORK = Path(os.environ.get("INT8EXP", "/tmp/int8exp"))

# FFN down projection: its input is the GELU output, whose few large outliers make one static
# per-tensor scale too coarse for the many small values.
FFN_DOWN = r"layers?[./]\d+/output/dense/MatMul"
ATTN_OUT = r"attention/output/dense/MatMul"


# --------------------------------------------------------------------------------------------------
# The recipe (self-contained: meant to move into encapure/export/quantize.py)
# --------------------------------------------------------------------------------------------------


def weight_matmuls(model_path: str | Path) -> list[str]:
    """Names of MatMul nodes whose second input is a constant weight (activation x activation
    MatMuls, i.e. attention scores/context, are left alone: their ranges vary per input)."""
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    consts = {o for n in m.graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in m.graph.node if n.op_type == "MatMul" and len(n.input) == 2
            and (n.input[1] in inits or n.input[1] in consts)]


def quantize_int8_static(
    fp32_model_path: str | Path,
    out_path: str | Path,
    calibration_inputs: list[dict[str, np.ndarray]],
    nodes_to_exclude: Sequence[str] = (FFN_DOWN,),
    *,
    method: str = "minmax",
    percentile: float = 99.999,
    quant_format: str = "qdq",
    per_channel: bool = True,
    reduce_range: bool = False,
    weight_type: str = "QInt8",
    activation_type: str = "QUInt8",
    activation_symmetric: bool = False,
    float_out: bool = True,
    extra_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Static int8 of the weight MatMuls of a transformer ONNX graph; returns the recipe record.

    ``nodes_to_exclude`` are regexes matched (re.search) against MatMul node names; matches stay
    fp32. Activation scales come from ``calibration_inputs`` (feeds of real, non-evaluation text,
    several lengths/batches) and are constants of the graph, so results are batch-invariant.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    fp32_model_path, out_path = Path(fp32_model_path), Path(out_path)
    candidates = weight_matmuls(fp32_model_path)
    excluded = [n for n in candidates if any(re.search(p, n) for p in nodes_to_exclude)]
    to_quantize = [n for n in candidates if n not in excluded]
    inputs = [i.name for i in onnx.load(str(fp32_model_path), load_external_data=False).graph.input]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it: Iterator[dict[str, np.ndarray]] = iter(
                [{k: v for k, v in f.items() if k in inputs} for f in calibration_inputs])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    opts: dict[str, Any] = {"ActivationSymmetric": activation_symmetric, "WeightSymmetric": True}
    if method == "percentile":
        opts["CalibPercentile"] = percentile
    if float_out:
        # keep MatMul outputs in float: no second (output) rounding, and ORT's CPU fusion turns
        # DQ(x), DQ(W) -> MatMul into one MatMulIntegerToFloat kernel (bias Add fused too)
        opts["OpTypesToExcludeOutputQuantization"] = ["MatMul"]
    opts.update(extra_options or {})
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = out_path.parent / (out_path.name + ".calib")
    tmp_dir.mkdir(exist_ok=True)
    try:
        quantize_static(
            str(fp32_model_path), str(out_path), Reader(),
            quant_format=QuantFormat.QDQ if quant_format == "qdq" else QuantFormat.QOperator,
            op_types_to_quantize=["MatMul"],
            nodes_to_quantize=to_quantize,
            per_channel=per_channel,
            reduce_range=reduce_range,
            activation_type=getattr(QuantType, activation_type),
            weight_type=getattr(QuantType, weight_type),
            calibrate_method=methods[method],
            calibration_providers=["CPUExecutionProvider"],
            extra_options=opts,
        )
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        for p in Path(".").glob("augmented_model*.onnx"):
            p.unlink(missing_ok=True)
    return {"method": "static", "calibration": method, "format": quant_format, "per_channel": per_channel,
            "reduce_range": reduce_range, "weight_type": weight_type, "activation_type": activation_type,
            "activation_symmetric": activation_symmetric, "float_out": float_out, "excluded_nodes": excluded,
            "quantized_matmuls": len(to_quantize), "calibration_batches": len(calibration_inputs)}


# --------------------------------------------------------------------------------------------------
# Models and graphs (data, feeds and sessions: experiments/_common.py)
# --------------------------------------------------------------------------------------------------


def latest(kind: str) -> Path:
    dirs = [d for d in MODELS.glob(f"{kind}-fp32-*") if (d / "encapure.json").exists()]
    if not dirs:
        sys.exit(f"no exported {kind} fp32 model under {MODELS} (run the test suite once)")
    return max(dirs, key=lambda d: int(json.loads((d / "encapure.json").read_text())["tool_versions"]
                                       .get("export_version", 0)) * 1e10 + d.stat().st_mtime)


def optimized_ops(path: Path) -> dict[str, int]:
    """Op histogram of ORT's optimized graph: shows whether Q/DQ got folded into int8 kernels."""
    import collections

    import onnx
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    o.optimized_model_filepath = str(path.with_suffix(".opt.onnx"))
    o.log_severity_level = 3
    ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])
    m = onnx.load(o.optimized_model_filepath, load_external_data=False)
    Path(o.optimized_model_filepath).unlink()
    c = collections.Counter(n.op_type for n in m.graph.node)
    keep = ("MatMul", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
            "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "Attention", "FusedMatMul",
            "SkipLayerNormalization", "MatMulNBits")
    return {k: v for k, v in sorted(c.items()) if k in keep}


# --------------------------------------------------------------------------------------------------
# Per-task data
# --------------------------------------------------------------------------------------------------


def rerank_data(folder: Path, max_length: int) -> dict[str, Any]:
    tok = tokenizer(folder, max_length)
    test = wikiqa("test")
    dev = pairs(wikiqa("dev"))
    rng = np.random.default_rng(0)
    calib_pairs = [dev[i] for i in rng.permutation(len(dev))[:256]]
    calib_encs = tok.encode_batch(calib_pairs)
    # add long multi-sentence passages: calibration must see long-sequence activation ranges too
    sents = [d for _, d in dev]
    long = [(dev[int(rng.integers(len(dev)))][0],
             " ".join(sents[s:s + int(rng.integers(3, 12))])) for s in rng.integers(0, len(sents) - 12, 64)]
    calib_encs += tok.encode_batch(long)
    calib = [f for _, f in length_batches(calib_encs, 16)]
    test_encs = tok.encode_batch(pairs(test))
    ref = json.loads(RERANK_REF.read_text())["pairs"]
    inv = tok.encode_batch([(p["query"], p["passage"]) for p in ref])
    # "other traffic": long and short test pairs to batch the reference pairs with
    others = [test_encs[i] for i in rng.permutation(len(test_encs))[:40]]
    bench = [test_encs[i] for i in rng.permutation(len(test_encs))[:256]]
    return {"calib": calib, "test_groups": test, "test_encs": test_encs, "inv": inv, "others": others,
            "bench": bench}


def embed_data(folder: Path, max_length: int) -> dict[str, Any]:
    tok = tokenizer(folder, max_length)
    rng = np.random.default_rng(0)  # one draw for calibration then test texts, in that order
    calib_encs = tok.encode_batch(mixed_texts(wikiqa("dev"), 300, rng))
    test_encs = tok.encode_batch(mixed_texts(wikiqa("test"), 300, rng))
    idx = rng.permutation(len(test_encs))
    return {"calib": [f for _, f in length_batches(calib_encs, 16)], "test_encs": test_encs,
            "inv": [test_encs[i] for i in idx[:20]], "others": [test_encs[i] for i in idx[20:60]],
            "bench": [test_encs[i] for i in idx[:256]]}


# --------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------


def invariance(sess: Any, d: dict[str, Any], embed: bool) -> float:
    """Max |delta| of each reference item's output alone vs in batches with padding and other traffic."""
    inv, others = d["inv"], d["others"]
    alone = run_rows(sess, [(np.array([i]), feed([e])) for i, e in enumerate(inv)], len(inv), embed)
    n = len(inv)
    worst = 0.0
    rng = np.random.default_rng(1)
    # (a) all reference items in one batch, (b) each mixed into the 40 other items at random places,
    # (c) each alone but padded to 256
    mixes = [list(range(n))]
    for _ in range(3):
        mixes.append(list(rng.permutation(n + len(others))))
    for order in mixes:
        encs = [inv[i] if i < n else others[i - n] for i in order]
        out = run_rows(sess, [(np.arange(len(encs)), feed(encs))], len(encs), embed)
        got = np.zeros_like(alone)
        for pos, i in enumerate(order):
            if i < n:
                got[i] = out[pos]
        worst = max(worst, float(np.abs(got - alone).max()))
    padded = run_rows(sess, [(np.array([i]), feed([e], pad_to=256)) for i, e in enumerate(inv)], n, embed)
    return max(worst, float(np.abs(padded - alone).max()))


def rerank_map(sess: Any, d: dict[str, Any]) -> float:
    encs = d["test_encs"]
    return wikiqa_map(d["test_groups"], run_rows(sess, length_batches(encs, 32), len(encs), embed=False))


def speed(models: dict[str, Path], d: dict[str, Any], embed: bool, rounds: int) -> dict[str, dict[int, float]]:
    batches = length_batches(d["bench"], 32)
    n = len(d["bench"])
    res: dict[str, dict[int, list[float]]] = {k: {1: [], 2: []} for k in models}
    for threads in (1, 2):
        sessions = {k: session(p, threads) for k, p in models.items()}
        for s in sessions.values():
            run_rows(s, batches[:2], n, embed)  # warm-up
        for _ in range(rounds):
            for k, s in sessions.items():  # alternated: shared-machine noise hits all alike
                t0 = time.perf_counter()
                run_rows(s, batches, n, embed)
                res[k][threads].append(n / (time.perf_counter() - t0))
    return {k: {t: float(np.median(v)) for t, v in tv.items()} for k, tv in res.items()}


# --------------------------------------------------------------------------------------------------


def candidates(task: str) -> dict[str, dict[str, Any]]:
    """name -> quantize_int8_static kwargs."""
    base: dict[str, Any] = {}
    c = {
        # output-requantized (QDQ around the MatMul output too -> QLinearMatMul)
        "st-minmax-all": dict(base, nodes_to_exclude=(), float_out=False),
        "st-minmax-xffn": dict(base, nodes_to_exclude=(FFN_DOWN,), float_out=False),
        "st-minmax-xffn-rr": dict(base, nodes_to_exclude=(FFN_DOWN,), reduce_range=True, float_out=False),
        # no requantization of the MatMul output: ORT fuses DQ->MatMul into MatMulIntegerToFloat
        "st-minmax-all-fo": dict(base, nodes_to_exclude=(), float_out=True),
        "st-minmax-xffn-fo": dict(base, nodes_to_exclude=(FFN_DOWN,), float_out=True),
        "st-minmax-xffn-fo-rr": dict(base, nodes_to_exclude=(FFN_DOWN,), float_out=True, reduce_range=True),
        # u8 weights: AVX2's u8s8 kernel (vpmaddubsw) can saturate int16; u8u8 cannot
        "st-minmax-xffn-fo-u8w": dict(base, nodes_to_exclude=(FFN_DOWN,), float_out=True, weight_type="QUInt8"),
        "st-ema-xffn-fo": dict(base, nodes_to_exclude=(FFN_DOWN,), float_out=True,
                               extra_options={"CalibMovingAverage": True}),
        "st-minmax-xffn-xattn-fo": dict(base, nodes_to_exclude=(FFN_DOWN, ATTN_OUT), float_out=True),
        "st-ema-xffn-fo-u8w": dict(base, nodes_to_exclude=(FFN_DOWN,), float_out=True, weight_type="QUInt8",
                                   extra_options={"CalibMovingAverage": True}),
        "st-ema-xffn-xattn-fo-u8w": dict(base, nodes_to_exclude=(FFN_DOWN, ATTN_OUT), float_out=True,
                                         weight_type="QUInt8", extra_options={"CalibMovingAverage": True}),
    }
    only = os.environ.get("CANDS")
    if only:
        c = {k: v for k, v in c.items() if k in only.split(",")}
    return c


def experiment(task: str, quick: bool) -> None:
    embed = task == "embed"
    src = latest("embedder" if embed else "reranker")
    man = json.loads((src / "encapure.json").read_text())
    dyn_dirs = sorted(MODELS.glob(f"{'embedder' if embed else 'reranker'}-int8-*"), key=lambda p: p.stat().st_mtime)
    dyn_dirs = [p for p in dyn_dirs if (p / "model.onnx").exists()]
    print(f"\n=== {task}: fp32 {src.name}; dynamic int8 {dyn_dirs[-1].name if dyn_dirs else '-'}", flush=True)
    d = embed_data(src, man["max_length"]) if embed else rerank_data(src, man["max_length"])
    models: dict[str, Path] = {"fp32": src / "model.onnx"}
    if dyn_dirs:
        models["dynamic-int8"] = dyn_dirs[-1] / "model.onnx"
        q = json.loads((dyn_dirs[-1] / "encapure.json").read_text())["quantization"]
        print(f"dynamic recipe: {q.get('name')} exclude={q.get('exclude')} u8={q.get('u8_nodes')}")
    for name, kw in candidates(task).items():
        out = WORK / f"{task}-{name}"
        if not (out / "model.onnx").exists() or os.environ.get("REBUILD"):
            shutil.copytree(src, out, dirs_exist_ok=True)
            t0 = time.perf_counter()
            rec = quantize_int8_static(src / "model.onnx", out / "model.onnx", d["calib"], **kw)
            print(f"built {name} in {time.perf_counter() - t0:.0f}s: {rec['quantized_matmuls']} MatMuls int8, "
                  f"{len(rec['excluded_nodes'])} fp32", flush=True)
            m = json.loads((out / "encapure.json").read_text())
            m["precision"] = "int8"
            m["quantization"] = {k: v for k, v in rec.items()}
            m.get("files", {}).pop("model.onnx", None)
            (out / "encapure.json").write_text(json.dumps(m, indent=2))
        models[name] = out / "model.onnx"

    ref_sess = session(models["fp32"], 2)
    ref_emb = run_rows(ref_sess, length_batches(d["test_encs"], 32), len(d["test_encs"]), True) if embed else None
    rows = {}
    for name, p in models.items():
        s = session(p, 2)
        r: dict[str, Any] = {"ops": optimized_ops(p), "inv": invariance(s, d, embed)}
        if embed:
            e = run_rows(s, length_batches(d["test_encs"], 32), len(d["test_encs"]), True)
            cos = (e * ref_emb).sum(1)
            r["min_cos"], r["mean_cos"] = float(cos.min()), float(cos.mean())
        else:
            r["map"] = rerank_map(s, d)
        rows[name] = r
        print(f"  {name}: {r}", flush=True)
    sp = speed(models, d, embed, rounds=2 if quick else 5)
    unit = "texts/s" if embed else "pairs/s"
    print(f"\n{task} (machine shared; {unit} = median of alternated rounds, 256 items, batches of 32 by length)")
    hdr = f"{'model':24s} {'inv max|d|':>11s} " + ("  min cos  mean cos" if embed else "  MAP     %fp32") + \
        f"  {unit}@1t  {unit}@2t  x fp32@1t x fp32@2t"
    print(hdr)
    f1, f2 = sp["fp32"][1], sp["fp32"][2]
    for name, r in rows.items():
        q = f"{r['min_cos']:.4f}   {r['mean_cos']:.5f}" if embed else \
            f"{r['map']:.4f} {100 * r['map'] / rows['fp32']['map']:6.2f}%"
        print(f"{name:24s} {r['inv']:11.2e}   {q}  {sp[name][1]:9.1f}  {sp[name][2]:9.1f}  "
              f"{sp[name][1] / f1:8.2f}  {sp[name][2] / f2:8.2f}")
    print("optimized-graph ops:")
    for name, r in rows.items():
        print(f"  {name}: {r['ops']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("task", nargs="?", choices=["rerank", "embed", "both"], default="both")
    ap.add_argument("--quick", action="store_true", help="2 speed rounds instead of 5")
    args = ap.parse_args()
    for t in (["rerank", "embed"] if args.task == "both" else [args.task]):
        experiment(t, args.quick)


if __name__ == "__main__":
    main()

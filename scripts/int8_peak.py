#!/usr/bin/env python
"""How far is the int8 reranker from this machine's int8 peak? (issue 11; a measurement, not a test)

Peak: a large GEMM in the runtimes we serve with, built as an ONNX graph in our quantization style
(``QuantizeLinear`` of the fp32 activation with a constant u8 scale/zero point -> ``DequantizeLinear``,
per-channel s8 7-bit constant weights -> ``DequantizeLinear``, ``MatMul``; ONNX Runtime fuses it into
``MatMulIntegerToFloat``, OpenVINO into a u8 ``FullyConnected``), and the same GEMM in fp32. Sessions
come from the engine's own backend code (``create_session``/``OpenVINOSession``), so thread counts,
graph optimisation and OpenVINO's config are the ones a server gets.

Achieved: the MatMul FLOPs the model does per pair (counted from the ONNX graph by shape inference at
each real token length; attention's QK^T and AV included) times the pairs/s the engine reaches on
WikiQA-test-gold with its own batching. The int8 weight MatMuls are set against the int8 peak, the
attention MatMuls (fp32 in both runtimes) against the fp32 peak; "MatMul-bound time" is the time
those FLOPs would take at peak. A profile of the engine's own batches (ORT ``enable_profiling``,
OpenVINO ``PERF_COUNT``) says which share of the time goes to MatMuls at all.

Usage::

    python scripts/int8_peak.py [--threads 1,2] [--rounds 3] [--md docs/peak.md] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ENCAPURE_SHARED", ROOT.parent / "shared"))
WIKIQA = SHARED / "data" / "wikiqa" / "WikiQA-test-gold.tsv"
DEFAULT_MODEL = ROOT.parent / "main" / "benchmarks" / ".work" / "models" / "reranker-int8-v9"

# (M, K, N): the model's own projection shapes (hidden 384, FFN 1536) at a large token count, a big
# square GEMM that no small-model shape reaches, and the projections at M=512, about the tokens of
# one engine batch on WikiQA (16 pairs of ~40 tokens): the peak is the best of them all.
SHAPES: list[tuple[int, int, int]] = [(4096, 384, 1536), (4096, 1536, 384), (4096, 384, 384), (2048, 2048, 2048),
                                      (512, 384, 1536), (512, 1536, 384), (512, 384, 384)]
QUICK_SHAPES: list[tuple[int, int, int]] = [(1024, 384, 1536), (1024, 384, 384)]
# Node types whose time counts as "MatMul" in the profiles.
ORT_MATMUL_OPS = {"MatMul", "MatMulIntegerToFloat", "MatMulInteger", "QLinearMatMul", "Gemm", "FusedMatMul",
                  "DynamicQuantizeMatMul", "QGemm"}
OV_MATMUL_TYPES = {"FullyConnected", "MatMul", "Gemm"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- FLOP counting ----------------------------------------------------------------------------
@dataclass(frozen=True)
class MatMulCost:
    name: str
    int8: bool  # an input comes from DequantizeLinear: the runtime runs it as an integer GEMM
    flops: int  # 2 x (output elements) x K


def matmul_costs(model: Any, dims: dict[str, int]) -> list[MatMulCost]:
    """Every MatMul of ``model`` with its FLOPs once the named input dims take the given values.

    Shapes come from ONNX Runtime's symbolic shape inference, which folds the Shape/Gather/Concat
    chains BERT exports build their Reshapes from, so attention's per-head MatMuls get real shapes.
    A MatMul whose shape stays unknown is an error: a silent zero would inflate the headroom.
    """
    import onnx
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    m = onnx.ModelProto()
    m.CopyFrom(model)
    for inp in m.graph.input:
        for d in inp.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param in dims:
                d.dim_value = dims[d.dim_param]
    inferred = SymbolicShapeInference.infer_shapes(m, auto_merge=True)
    shapes: dict[str, list[int | str]] = {}
    for v in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        shapes[v.name] = [d.dim_value if d.HasField("dim_value") else d.dim_param
                          for d in v.type.tensor_type.shape.dim]
    for init in inferred.graph.initializer:
        shapes[init.name] = list(init.dims)
    producer = {o: n.op_type for n in inferred.graph.node for o in n.output}
    out: list[MatMulCost] = []
    for node in inferred.graph.node:
        if node.op_type != "MatMul":
            continue
        a, y = shapes.get(node.input[0]), shapes.get(node.output[0])
        if not a or y is None or not all(isinstance(d, int) and d > 0 for d in [*a, *y]):
            raise ValueError(f"MatMul {node.name!r}: shapes not inferred ({a} -> {y}) for dims {dims}")
        k = int(a[-1])
        flops = 2 * k * int(np.prod([int(d) for d in y], dtype=np.int64)) if y else 2 * k
        int8 = any(producer.get(i) == "DequantizeLinear" for i in node.input)
        out.append(MatMulCost(node.name, int8, flops))
    return out


class FlopCounter:
    """(int8, fp32) MatMul FLOPs of one sequence of a given length, cached per length."""

    def __init__(self, model: Any, batch_dim: str = "batch", length_dim: str = "sequence") -> None:
        self.model = model
        self.batch_dim, self.length_dim = batch_dim, length_dim
        self._cache: dict[int, tuple[int, int]] = {}

    def per_sequence(self, length: int) -> tuple[int, int]:
        if length not in self._cache:
            costs = matmul_costs(self.model, {self.batch_dim: 1, self.length_dim: length})
            self._cache[length] = (sum(c.flops for c in costs if c.int8), sum(c.flops for c in costs if not c.int8))
        return self._cache[length]

    def total(self, lengths: Sequence[int]) -> tuple[int, int]:
        i8 = f32 = 0
        for n in lengths:
            a, b = self.per_sequence(int(n))
            i8, f32 = i8 + a, f32 + b
        return i8, f32


# --- the peak GEMMs ---------------------------------------------------------------------------
def gemm_model(m: int, k: int, n: int, *, int8: bool, seed: int = 0) -> Any:
    """An ``[m, k] x [k, n]`` MatMul graph; int8 in our QDQ style (see the module docstring)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])
    if int8:
        w = rng.integers(-64, 64, size=(k, n), dtype=np.int8)  # reduce_range: 7-bit signed weights
        inits = [numpy_helper.from_array(np.array(0.02, np.float32), "x_scale"),
                 numpy_helper.from_array(np.array(128, np.uint8), "x_zp"),
                 numpy_helper.from_array(w, "w_q"),
                 numpy_helper.from_array((rng.random(n, dtype=np.float32) + 0.5) * 0.01, "w_scale"),
                 numpy_helper.from_array(np.zeros(n, np.int8), "w_zp")]
        nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"]),
                 helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"]),
                 helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w_dq"], axis=1),
                 helper.make_node("MatMul", ["x_dq", "w_dq"], ["y"])]
    else:
        inits = [numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32) * 0.05, "w")]
        nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    graph = helper.make_graph(nodes, f"gemm_{m}x{k}x{n}", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _settings(backend: Any, threads: int, workers: int = 1) -> Any:
    from encapure.settings import Settings

    return Settings(backend=backend, threads_per_worker=threads, workers=workers, openvino_inference_precision="f32")


def best_seconds(fn: Callable[[], Any], *, warmup: int = 2, runs: int = 5, min_s: float = 0.5) -> float:
    """Best single-call time after ``warmup`` calls; at least ``runs`` calls and ``min_s`` seconds."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    start = time.perf_counter()
    i = 0
    while i < runs or time.perf_counter() - start < min_s:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        i += 1
    return best


def ort_gemm(path: Path, x: np.ndarray, threads: int, opt_dir: Path) -> tuple[Callable[[], Any], str]:
    """A timed call of the GEMM in ONNX Runtime (output bound once) and the ops its optimiser left."""
    import onnx
    import onnxruntime as ort

    from encapure.engine.backends.onnxruntime import session_options

    so = session_options(_settings("onnxruntime", threads))
    opt = opt_dir / f"{path.stem}.opt.onnx"
    so.optimized_model_filepath = str(opt)
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    ops = "+".join(n.op_type for n in onnx.load(str(opt)).graph.node)
    binding = sess.io_binding()
    binding.bind_cpu_input("x", x)
    binding.bind_output("y", "cpu")
    sess.run_with_iobinding(binding)  # allocates y once; later runs reuse it
    y = binding.get_outputs()[0]
    binding.bind_ortvalue_output("y", y)
    return (lambda: sess.run_with_iobinding(binding)), ops


def ov_gemm(path: Path, x: np.ndarray, threads: int) -> tuple[Callable[[], Any], str]:
    """A timed call of the GEMM in OpenVINO, compiled with the engine's config, and the runtime
    precision of its GEMM node (u8/i8 = the integer kernel really runs)."""
    import openvino as ov

    from encapure.engine.backends.openvino import OpenVINOSession

    session = OpenVINOSession(path, _settings("openvino", threads))
    compiled = session._compiled  # the engine's compiled model; its run() would copy the output
    prec = gemm_precisions(compiled)
    request = compiled.create_infer_request()
    request.set_input_tensor(0, ov.Tensor(x))
    return request.infer, prec


def gemm_precisions(compiled: Any) -> str:
    """``layerType:runtimePrecision`` counts of the GEMM nodes in OpenVINO's runtime (exec) graph."""
    counts: dict[str, int] = defaultdict(int)
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kind = info["layerType"].astype(str)
        if kind in OV_MATMUL_TYPES:
            counts[f"{kind}:{info['runtimePrecision'].astype(str)}"] += 1
    return ", ".join(f"{k} x{v}" if v > 1 else k for k, v in sorted(counts.items()))


def measure_peaks(shapes: list[tuple[int, int, int]], threads: list[int], workdir: Path) -> list[dict[str, Any]]:
    import onnx

    rows = []
    for m, k, n in shapes:
        x = np.random.default_rng(1).standard_normal((m, k), dtype=np.float32)
        for int8 in (True, False):
            path = workdir / f"gemm_{m}x{k}x{n}_{'int8' if int8 else 'fp32'}.onnx"
            onnx.save(gemm_model(m, k, n, int8=int8), str(path))
            for t in threads:
                for runtime in ("onnxruntime", "openvino"):
                    if runtime == "onnxruntime":
                        call, kernel = ort_gemm(path, x, t, workdir)
                    else:
                        call, kernel = ov_gemm(path, x, t)
                    sec = best_seconds(call)
                    gops = 2 * m * k * n / sec / 1e9
                    rows.append({"runtime": runtime, "precision": "int8" if int8 else "fp32", "threads": t,
                                 "shape": f"{m}x{k}x{n}", "gops": gops, "kernel": kernel})
                    log(f"  {runtime:11s} {'int8' if int8 else 'fp32'} t={t} {m}x{k}x{n}: {gops:7.1f} GOPS "
                        f"({kernel})")
                    del call
    return rows


# --- the model --------------------------------------------------------------------------------
class Recorder:
    """Passes ``run`` through to the engine's session and keeps a copy of each feed."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.feeds: list[dict[str, np.ndarray]] = []

    def run(self, names: Any, feed: dict[str, Any]) -> Any:
        self.feeds.append({k: np.array(v) for k, v in feed.items()})
        return self.session.run(names, feed)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)


def wikiqa_pairs() -> list[tuple[str, str]]:
    from encapure.evaluation import load_dataset
    from encapure.evaluation import pairs as pairs_of

    return pairs_of(load_dataset(WIKIQA))


Config = tuple[str, int, int]  # (backend, workers, threads per worker)


@dataclass
class EngineRun:
    whole: dict[Config, float]  # best seconds of a whole pass over the pairs
    batch_best: dict[Config, float]  # sum over the engine's batches of each batch's best seconds
    lengths: list[int]  # tokens per pair as the engine fed them
    feeds: list[dict[str, np.ndarray]]  # the batches the engine built


def engine_rates(folder: Path, pairs: list[tuple[str, str]], configs: list[Config], rounds: int) -> EngineRun:
    """Score all pairs with the engine per config, ``rounds`` alternating passes (best kept).

    A whole pass takes seconds, a peak GEMM milliseconds: on a shared machine the GEMM's best run
    finds a quiet moment more easily. So the single-worker configs are also timed batch by batch
    (each of the engine's batches ``rounds`` times through the engine's session, the best kept,
    summed), the peak's best-of-short-runs method. On the loaded runs of docs/int8-headroom.md it
    came out slower than the whole pass, not faster: it is a cross-check, not the headline.
    """
    from encapure.engine import Reranker

    rerankers = {}
    for cfg in configs:
        backend, workers, threads = cfg
        rerankers[cfg] = Reranker.from_pretrained(folder, settings=_settings(backend, threads, workers))
    first = rerankers[configs[0]]
    lengths = list(first.pair_list_request(pairs, raw_scores=True, truncate=True,
                                           long_documents="truncate")().tokens)
    recorder = Recorder(first.model.session)
    first.model.session = recorder
    first.score(pairs, raw_scores=True)  # warm-up, and the engine's own batches for the profiles
    first.model.session = recorder.session
    for r in rerankers.values():
        r.score(pairs[:64], raw_scores=True)
    best = {cfg: float("inf") for cfg in configs}
    for rnd in range(rounds):
        for cfg in configs if rnd % 2 == 0 else list(reversed(configs)):
            t0 = time.perf_counter()
            rerankers[cfg].score(pairs, raw_scores=True)
            dt = time.perf_counter() - t0
            best[cfg] = min(best[cfg], dt)
            log(f"  round {rnd + 1} {cfg[0]:11s} {cfg[1]}x{cfg[2]}: {len(pairs) / dt:7.1f} pairs/s")
    feeds = recorder.feeds
    single = [cfg for cfg in configs if cfg[1] == 1]
    per_batch = {cfg: [float("inf")] * len(feeds) for cfg in single}
    # A config's batches run back to back (alternating configs per round, not per batch), so its
    # weights stay in cache as in a real pass; switching sessions every batch evicted them.
    for rnd in range(rounds):
        for cfg in single if rnd % 2 == 0 else list(reversed(single)):
            session = rerankers[cfg].model.session
            for j, feed in enumerate(feeds):
                t0 = time.perf_counter()
                session.run(None, feed)
                per_batch[cfg][j] = min(per_batch[cfg][j], time.perf_counter() - t0)
    batch_best = {cfg: sum(v) for cfg, v in per_batch.items()}
    for cfg, sec in batch_best.items():
        log(f"  per-batch best {cfg[0]:11s} {cfg[1]}x{cfg[2]}: {len(pairs) / sec:7.1f} pairs/s")
    for r in rerankers.values():
        r.close()
    return EngineRun(best, batch_best, lengths, feeds)


def ort_profile(model_path: Path, feeds: list[dict[str, np.ndarray]], threads: int, workdir: Path) -> dict[str, float]:
    """Microseconds per ONNX Runtime op type over ``feeds`` (one profiled session, engine options)."""
    import onnxruntime as ort

    from encapure.engine.backends.onnxruntime import session_options

    so = session_options(_settings("onnxruntime", threads))
    so.enable_profiling = True
    so.profile_file_prefix = str(workdir / "ort_profile")
    sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    for f in feeds[:2]:
        sess.run(None, f)
    sess.end_profiling()
    so.profile_file_prefix = str(workdir / "ort_profile_main")
    sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    for f in feeds:
        sess.run(None, f)
    events = json.loads(Path(sess.end_profiling()).read_text())
    per_op: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += float(e["dur"])
        elif e.get("cat") == "Session" and e.get("name") == "model_run":
            per_op["<model_run>"] += float(e["dur"])
    return dict(per_op)


def ov_profile(model_path: Path, feeds: list[dict[str, np.ndarray]], threads: int) -> dict[str, float]:
    """Microseconds per OpenVINO node type over ``feeds`` (``PERF_COUNT``, the engine's config)."""
    import openvino as ov

    cfg = _settings("openvino", threads)
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(model_path)), "CPU", {
        "INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": "1", "INFERENCE_PRECISION_HINT": "f32",
        "DYNAMIC_QUANTIZATION_GROUP_SIZE": int(cfg.openvino_dynamic_quantization_group_size),
        "ENABLE_CPU_PINNING": False, "PERF_COUNT": True})
    request = compiled.create_infer_request()
    per_type: dict[str, float] = defaultdict(float)
    for f in feeds[:2]:
        request.infer(f)
    for f in feeds:
        t0 = time.perf_counter()
        request.infer(f)
        per_type["<model_run>"] += (time.perf_counter() - t0) * 1e6
        for p in request.get_profiling_info():
            if p.status.name == "EXECUTED":
                key = p.node_type + (":I8" if "I8" in p.exec_type.upper() else "")
                per_type[key] += p.real_time.total_seconds() * 1e6
    return dict(per_type)


def matmul_share(per_op: dict[str, float], matmul_ops: set[str]) -> tuple[float, float, list[tuple[str, float]]]:
    """(MatMul share of node time, node time / wall run time, top node types by time)."""
    nodes = {k: v for k, v in per_op.items() if not k.startswith("<")}
    total = sum(nodes.values()) or 1.0
    mm = sum(v for k, v in nodes.items() if k.split(":")[0] in matmul_ops)
    wall = per_op.get("<model_run>", 0.0)
    top = sorted(((k, v / total) for k, v in nodes.items()), key=lambda kv: -kv[1])[:6]
    return mm / total, (total / wall if wall else float("nan")), top


# --- report -----------------------------------------------------------------------------------
def cpu_label() -> str:
    text = Path("/proc/cpuinfo").read_text()
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "?")
    flags_line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    flags = set(flags_line.split(":", 1)[-1].split())
    isa = " ".join(f"{f}{'+' if f in flags else '-'}" for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8"))
    return f"{model}, {os.cpu_count()} logical CPUs; {isa}"


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def fmt(x: float, nd: int = 1) -> str:
    return f"{x:.{nd}f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="exported int8 reranker folder")
    ap.add_argument("--threads", default="1,2", help="thread counts for the peak GEMMs")
    ap.add_argument("--rounds", type=int, default=3, help="alternating engine rounds (best kept)")
    ap.add_argument("--quick", action="store_true", help="small GEMMs, 300 pairs, 1 round (a smoke run)")
    ap.add_argument("--no-profile", action="store_true", help="skip the per-op profiles")
    ap.add_argument("--md", type=Path, help="also write the markdown report here")
    args = ap.parse_args(argv)
    import onnx

    threads = [int(t) for t in args.threads.split(",")]
    load_start = load_avg()
    cpu = cpu_label()
    log(f"CPU: {cpu}; load {load_start}")
    pairs = wikiqa_pairs()
    shapes = SHAPES
    if args.quick:
        pairs, shapes, args.rounds = pairs[:300], QUICK_SHAPES, 1
    model_path = args.model / "model.onnx"
    counter = FlopCounter(onnx.load(str(model_path)))

    with tempfile.TemporaryDirectory(prefix="int8_peak_") as tmp:
        workdir = Path(tmp)
        log("peak GEMMs ...")
        gemms = measure_peaks(shapes, threads, workdir)
        # Engine configs: (backend, workers, threads per worker). workers=2 x 1 thread is how the
        # library serves on 2 cores (Settings default); 1 x 2 is one 2-thread run like the peak GEMM.
        configs: list[tuple[str, int, int]] = []
        for backend in ("onnxruntime", "openvino"):
            for t in threads:
                configs.append((backend, 1, t))
                if t > 1:
                    configs.append((backend, t, 1))
        log(f"engine on {len(pairs)} WikiQA-test-gold pairs ...")
        run = engine_rates(args.model, pairs, configs, args.rounds)
        lengths, feeds = run.lengths, run.feeds
        i8_flops, f32_flops = counter.total(lengths)
        padded = [int(f["input_ids"].shape[0]) * int(f["input_ids"].shape[1]) for f in feeds]
        pad_i8 = sum(int(f["input_ids"].shape[0]) * counter.per_sequence(int(f["input_ids"].shape[1]))[0]
                     for f in feeds)
        pad_f32 = sum(int(f["input_ids"].shape[0]) * counter.per_sequence(int(f["input_ids"].shape[1]))[1]
                      for f in feeds)
        profiles: dict[str, tuple[float, float, list[tuple[str, float]]]] = {}
        if not args.no_profile:
            pt = min(threads)  # the engine serves 2 cores as 2 workers x 1 thread
            log(f"profiles ({len(feeds)} engine batches, {pt} threads) ...")
            profiles["onnxruntime"] = matmul_share(ort_profile(model_path, feeds, pt, workdir), ORT_MATMUL_OPS)
            profiles["openvino"] = matmul_share(ov_profile(model_path, feeds, pt), OV_MATMUL_TYPES)
    load_end = load_avg()

    lines: list[str] = []
    add = lines.append
    add("## int8 headroom: the reranker vs a large GEMM in the same runtime")
    add("")
    add(f"- CPU: {cpu}")
    add(f"- load average (1/5/15 min) at start {load_start}, at end {load_end}")
    add(f"- model: {args.model.name} ({model_path.stat().st_size / 1e6:.1f} MB); WikiQA-test-gold {len(pairs)} pairs, "
        f"tokens per pair mean {np.mean(lengths):.1f}, median {np.median(lengths):.0f}, max {max(lengths)}")
    add(f"- MatMul work per pair at real lengths: {i8_flops / len(pairs) / 1e6:.1f} MFLOP int8 (weight MatMuls) + "
        f"{f32_flops / len(pairs) / 1e6:.1f} MFLOP fp32 (attention QK^T, AV); with the engine's batch padding "
        f"{(pad_i8 + pad_f32) / (i8_flops + f32_flops):.3f}x that ({sum(padded) / sum(lengths):.3f}x the tokens)")
    add("")
    add("### Peak: one GEMM, best of >=5 runs after warm-up (GOPS = 2*M*K*N / s)")
    add("")
    add("| runtime | precision | threads | M x K x N | GOPS | kernel (ORT fused ops / OpenVINO exec precision) |")
    add("|---|---|---:|---|---:|---|")
    for g in gemms:
        add(f"| {g['runtime']} | {g['precision']} | {g['threads']} | {g['shape']} | {fmt(g['gops'])} | {g['kernel']} |")
    peak: dict[tuple[str, str, int], float] = {}
    for g in gemms:
        key = (g["runtime"], g["precision"], g["threads"])
        peak[key] = max(peak.get(key, 0.0), g["gops"])
    add("")
    add("### Achieved: the engine on WikiQA-test-gold (best of "
        f"{args.rounds} alternating rounds), against the best GEMM of the same runtime and thread count")
    add("")
    add("| runtime | workers x threads | timing | pairs/s | achieved GOPS (int8 + fp32 MatMuls) | int8 peak "
        "| fp32 peak | % of int8 peak | MatMul-bound time / actual |")
    add("|---|---|---|---:|---:|---:|---:|---:|---:|")
    timings = [(cfg, "whole pass", sec) for cfg, sec in run.whole.items()]
    timings += [(cfg, "per-batch best", sec) for cfg, sec in run.batch_best.items()]
    for cfg, how, sec in sorted(timings, key=lambda x: (x[0][0], x[0][1] * x[0][2], x[0][1], x[1])):
        backend, workers, t = cfg
        total_threads = workers * t
        p8, p32 = peak.get((backend, "int8", total_threads)), peak.get((backend, "fp32", total_threads))
        if p8 is None or p32 is None:
            continue
        achieved = (i8_flops + f32_flops) / sec / 1e9
        bound = (i8_flops / (p8 * 1e9) + f32_flops / (p32 * 1e9)) / sec
        add(f"| {backend} | {workers} x {t} | {how} | {fmt(len(pairs) / sec)} | {fmt(achieved)} | {fmt(p8)} "
            f"| {fmt(p32)} | {100 * achieved / p8:.1f}% | {100 * bound:.1f}% |")
    if profiles:
        add("")
        add(f"### Where the time goes: the engine's {len(feeds)} batches replayed, {min(threads)} thread(s), one "
            "profiled session (ORT enable_profiling / OpenVINO PERF_COUNT)")
        add("")
        add("| runtime | MatMul share of node time | node time / wall | top node types (share of node time) |")
        add("|---|---:|---:|---|")
        for rt, (share, cover, top) in profiles.items():
            tops = ", ".join(f"{k} {100 * v:.0f}%" for k, v in top)
            add(f"| {rt} | {100 * share:.1f}% | {100 * cover:.0f}% | {tops} |")
    add("")
    add("MatMul-bound time: the time the model's MatMul FLOPs would take at the runtime's peak (int8 weight "
        "MatMuls at the int8 GEMM peak, fp32 attention MatMuls at the fp32 peak), over the measured time; "
        "100% would mean nothing but peak-rate GEMMs. Peaks of 2 threads are set against the engine's "
        "2 x 1 and 1 x 2 runs alike. Per-batch best: each of the engine's batches timed through its "
        "session, best of the rounds, summed (single-worker configs; tokenization excluded), meant to "
        "match the peak's best-of-short-runs method.")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.md:
        args.md.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Precision recipes: int8 (static, per-token or dynamic), int4 (MatMulNBits weight-only), fp16.

The int8 recipe is chosen per task from measurements on this AVX2 CPU (see scripts/measure_export.py
and the closing note of issue 2): which MatMuls stay fp32, per-channel or per-tensor, signedness.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from encapure.errors import ExportError
from encapure.export.onnx_export import save_model
from encapure.export.progress import Progress


@contextmanager
def quiet_logs() -> Iterator[None]:
    """ORT's quantizers log every node at INFO and nag about pre-processing on the root logger."""
    names = ["", "onnxruntime", "onnxruntime.quantization", "onnxruntime.quantization.matmul_nbits_quantizer"]
    loggers = [logging.getLogger(n) for n in names]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, saved, strict=True):
            lg.setLevel(lvl)


def _matmul_weight_nodes(model: Any) -> list[tuple[str, int]]:
    """(node name, layer index or -1) of MatMuls with a constant weight, in graph order."""
    import re

    inits = {i.name for i in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in inits:
            m = re.search(r"layer[s]?[./_](\d+)[./_]", n.name)
            out.append((n.name, int(m.group(1)) if m else -1))
    return out


def _is_word_table(node_name: str) -> bool:
    """The token-embedding lookup (BERT/XLM-R ``word_embeddings``, Qwen/Llama ``embed_tokens``)."""
    return "word_embeddings" in node_name or "embed_tokens" in node_name


# FFN down projections (input = GELU output, whose outliers per-tensor u8 activations handle badly),
# FFN up projections and attention output projections, matched on the TorchScript exporter's names.
FFN_OUT = r"layers?[./]\d+/output/dense/MatMul"
FFN_UP = r"layers?[./]\d+/intermediate/dense/MatMul"
ATTN_OUT = r"attention/output/dense/MatMul"


INT8_SCHEMES = ("auto", "static", "per-token")


def int8_recipe(task: str, model_type: str, *, large: bool = False, scheme: str = "auto") -> dict[str, Any]:
    """The int8 recipe per task: calibrated static int8, chosen from measurements.

    Static, because dynamic int8 computes each activation scale over the whole batch at run time, so
    a result moved with its batch-mates (0.44 logits for a reranker pair, 0.011 for an embedding)
    and with the CPU's int8 kernel. Weights are per-channel s8 in 7 bits (reduce_range): AVX2's
    u8 x s8 kernel sums pairs of products in int16, which 8-bit weights can overflow; with 7 bits no
    sum can, so the integer GEMM is exact on AVX2 and on AVX-512 VNNI alike.

    Measured on AVX-512 VNNI, 2 threads (experiments/int8_static_experiment.py holds the search):
    - Rerankers: every weight MatMul + the word-embedding table (bge-reranker-v2-m3's 1 GB fp32 table
      becomes 250 MB). Reranker fixture, WikiQA-test-gold: MAP 99.75% of fp32 at 1.81x its speed;
      8-bit weights 99.49% at 1.63x; FFN down projections in fp32 ~100.5% but only 1.26x.
    - Embedders are judged by the worst text's cosine to sentence-transformers (all-MiniLM-L6-v2, 304
      mixed texts): every MatMul static gives 0.968 (1.59x fp32), all but the FFN down projections
      0.982 (1.31x); only the attention MatMuls in int8, both FFN MatMuls fp32, keeps every text at
      >= 0.993 (mean 0.997), at 1.13x fp32 — chosen for accuracy at a smaller file, not for speed.
    The dynamic recipe (``method="dynamic"``) stays available to ``quantize_int8``.

    ``large`` (an fp32 graph over 2 GB, e.g. bge-reranker-v2-m3): ONNX Runtime's static quantizer did
    not fit such a model in memory here (calibrating it grew past 19 GB and was killed, on a 24 GB
    machine), so those keep dynamic int8 (every MatMul + the word embeddings, per-channel s8) until
    calibration runs within bounds; their scores still move slightly with batch-mates.

    Ranges are MinMax over every calibration batch. (ORT's ``CalibMaxIntermediateOutputs`` is not
    a memory knob: in onnxruntime 1.32 it drops the collected batches without folding their ranges,
    so only the last few batches would count.)

    ``scheme="per-token"``: every weight MatMul with one activation scale per token computed at run
    time (``quantize_int8_per_token``; no calibration, any size), plus the word-embedding table for
    rerankers; "auto" is the per-task choice above.
    """
    if scheme not in INT8_SCHEMES:
        raise ExportError(f"unknown int8 recipe {scheme!r}; choose one of {', '.join(INT8_SCHEMES)}")
    if scheme == "per-token":
        return {"method": "per-token", "name": "per-token-u8a8-s8w7", "weight_bits": 7, "activation_bits": 8,
                "gelu_offset": True, "exclude": [],
                "op_types": ["MatMul"] if task == "embed" else ["MatMul", "Gather"]}
    base: dict[str, Any] = {
        "method": "static",
        "weight_type": "QInt8",
        "per_channel": True,
        "reduce_range": True,
        "op_types": ["MatMul"],
        "exclude": [],
        "u8_nodes": [],
    }
    if large:
        base.update(method="dynamic", reduce_range=False, name="dynamic-s8+int8-embeddings (model over 2 GB)",
                    op_types=["MatMul", "Gather"] if task != "embed" else ["MatMul"])
    elif task == "embed":
        base.update(exclude=[FFN_OUT, FFN_UP], name="static-s8w7-attention")
    else:
        base.update(name="static-s8w7-minmax+int8-embeddings", op_types=["MatMul", "Gather"])
    return base


def quantize_int8(src: Path, dst: Path, recipe: dict[str, Any]) -> dict[str, Any]:
    """Dynamic int8. ``exclude`` regexes stay fp32; ``u8_nodes`` regexes get unsigned weights.

    Why u8 for some: on AVX2 without VNNI, ORT's u8 x s8 kernels add pairs of products in int16
    (VPMADDUBSW), which saturates when large activations (GELU outputs feeding the FFN down
    projection) meet large weights; u8 x u8 kernels do not, at some speed cost.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Graph only (no weights): for bge-reranker-v2-m3 this avoids holding another 2.2 GB copy.
    model = onnx.load(str(src), load_external_data=False)
    nodes = [n for n, _ in _matmul_weight_nodes(model)]
    exclude = resolve_exclusions(model, recipe.get("exclude", []))
    u8 = [n for n in resolve_exclusions(model, recipe.get("u8_nodes", [])) if n not in exclude]
    gathers: list[str] = []
    if "Gather" in recipe["op_types"]:
        # Only the word embedding table (XLM-R: 250k x 1024 = 1 GB fp32) is worth int8; position and
        # segment tables are small and sensitive.
        other = [n.name for n in model.graph.node if n.op_type == "Gather" and not _is_word_table(n.name)]
        exclude = exclude + other
        gathers = [n.name for n in model.graph.node if n.op_type == "Gather" and _is_word_table(n.name)]
    main_type = QuantType.QInt8 if recipe["weight_type"] == "QInt8" else QuantType.QUInt8
    extra = {"DefaultTensorType": onnx.TensorProto.FLOAT, "MatMulConstBOnly": True}
    passes: list[tuple[Any, list[str] | None, list[str]]] = []
    if u8 and main_type == QuantType.QInt8:
        passes.append((QuantType.QUInt8, u8, []))
        passes.append((main_type, None, exclude + u8))
    else:
        passes.append((main_type, None, exclude))
    with quiet_logs():
        try:
            current = src
            for i, (wtype, include, excl) in enumerate(passes):
                target = dst if i == len(passes) - 1 else dst.with_name(dst.name + f".pass{i}")
                quantize_dynamic(
                    str(current),
                    str(target),
                    weight_type=wtype,
                    per_channel=bool(recipe["per_channel"]),
                    reduce_range=bool(recipe["reduce_range"]),
                    op_types_to_quantize=list(recipe["op_types"]),
                    nodes_to_quantize=include,
                    nodes_to_exclude=excl,
                    extra_options=extra,
                )
                if current != src:
                    current.unlink()
                current = target
        except OSError:
            raise
        except Exception as e:
            raise ExportError(f"int8 quantization failed: {str(e).strip().splitlines()[0]}") from e
    applied = dict(recipe)
    applied["excluded_nodes"] = [n for n in exclude if n in set(nodes)]
    applied["quantized_matmuls"] = len(nodes) - len(applied["excluded_nodes"])
    applied["quantized_gathers"] = gathers
    applied["u8_weight_matmuls"] = len(u8)
    return applied


def quantize_int8_static(
    src: Path,
    dst: Path,
    recipe: dict[str, Any],
    calibration: list[dict[str, Any]],
) -> dict[str, Any]:
    """Calibrated static int8 (QDQ): activation scales are constants, so results are batch-invariant.

    Dynamic int8 scales each activation tensor by its max over the whole batch at run time, so a
    pair's score moved by up to ~0.8 logits with its batch-mates, and the CPU's int8 kernel (AVX2
    VPMADDUBSW vs AVX-512 VNNI) changed WikiQA MAP from 99.6% to 99.05% of fp32. With constant scales,
    quantizing an element depends on that element alone and the integer GEMM is exact.

    MatMul outputs stay float (``OpTypesToExcludeOutputQuantization``): ORT fuses DQ(x), DQ(W) ->
    MatMul into MatMulIntegerToFloat, with no second rounding. The word-embedding Gather, when the
    recipe asks for it, is quantized weight-only in a second pass (a QDQ Gather would dequantize the
    whole table on every run).
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    if not calibration:
        raise ExportError("static int8 needs calibration batches")
    graph = onnx.load(str(src), load_external_data=False)
    names = [n for n, _ in _matmul_weight_nodes(graph)]
    exclude = resolve_exclusions(graph, recipe.get("exclude", []))
    include = [n for n in names if n not in exclude]
    inputs = {i.name for i in graph.graph.input}
    large = src.with_name(src.name + ".data").exists() or any(
        i.data_location == onnx.TensorProto.EXTERNAL for i in graph.graph.initializer
    )
    gathers = [n.name for n in graph.graph.node if n.op_type == "Gather" and _is_word_table(n.name)]
    want_gather = "Gather" in recipe.get("op_types", []) and bool(gathers)
    del graph

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter([{k: v for k, v in f.items() if k in inputs} for f in calibration])

        def get_next(self) -> dict[str, Any] | None:
            return next(self._it, None)

    options: dict[str, Any] = {
        "ActivationSymmetric": False,
        "WeightSymmetric": True,
        "OpTypesToExcludeOutputQuantization": ["MatMul"],
    }
    target = dst.with_name(dst.name + ".static") if want_gather else dst
    with quiet_logs():
        try:
            quantize_static(
                str(src),
                str(target),
                _Reader(),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=["MatMul"],
                nodes_to_quantize=include,
                per_channel=bool(recipe.get("per_channel", True)),
                reduce_range=bool(recipe.get("reduce_range", False)),
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                use_external_data_format=large,
                calibration_providers=["CPUExecutionProvider"],
                extra_options=options,
            )
            if want_gather:
                quantize_dynamic(
                    str(target),
                    str(dst),
                    weight_type=QuantType.QInt8,
                    op_types_to_quantize=["Gather"],
                    nodes_to_quantize=gathers,
                    use_external_data_format=False,
                    extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
                )
        except OSError:
            raise
        except Exception as e:
            raise ExportError(f"static int8 quantization failed: {str(e).strip().splitlines()[0]}") from e
        finally:
            if want_gather:
                for p in (target, target.with_name(target.name + ".data")):
                    p.unlink(missing_ok=True)
    applied = dict(recipe)
    applied["excluded_nodes"] = exclude
    applied["quantized_matmuls"] = len(include)
    applied["quantized_gathers"] = gathers if want_gather else []
    applied["calibration_batches"] = len(calibration)
    return applied


def apply_precision(
    precision: str,
    fp32_path: Path,
    final: Path,
    *,
    recipe: dict[str, Any] | None,
    feeds: Callable[[], list[dict[str, Any]]],
    calibration: str | Path | None,
    prog: Progress,
) -> dict[str, Any]:
    """Turn the fp32 graph into ``final`` at ``precision`` (int8 per ``recipe``, calibrated on
    ``feeds()`` when static) and remove the fp32 intermediate; the manifest's quantization record.
    Every model family's exporter ends here, so a precision is added once."""
    quant: dict[str, Any] = {}
    if precision == "int8":
        if recipe is None:
            raise ExportError("int8 needs a recipe")
        with prog.step(f"Quantizing (int8, {recipe['method']})"):
            if recipe["method"] == "static":
                quant = quantize_int8_static(fp32_path, final, recipe, feeds())
                quant["calibration"] = str(calibration) if calibration else "encapure/data/calibration.jsonl"
            elif recipe["method"] == "per-token":
                quant = quantize_int8_per_token(fp32_path, final, recipe)
            else:
                quant = quantize_int8(fp32_path, final, recipe)
    elif precision == "int4":
        with prog.step("Quantizing (int4)"):
            quant = quantize_int4(fp32_path, final)
    elif precision == "fp16":
        with prog.step("Converting (fp16)"):
            quant = convert_fp16(fp32_path, final)
    if fp32_path != final:
        for p in (fp32_path, fp32_path.with_name(fp32_path.name + ".data")):
            if p.exists():
                p.unlink()
    return quant


def resolve_exclusions(model: Any, rules: list[str]) -> list[str]:
    """Names of weight MatMuls matching any exclusion rule (regular expressions, re.search)."""
    import re

    names = [n for n, _ in _matmul_weight_nodes(model)]
    out: list[str] = []
    for rule in rules:
        pattern = re.compile(rule)
        out.extend(n for n in names if pattern.search(n) and n not in out)
    return out


def quantize_int4(src: Path, dst: Path, *, block_size: int = 32, gather: bool = True) -> dict[str, Any]:
    """4-bit weight-only MatMuls (MatMulNBits); the word embedding Gather too when asked."""
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mnb

    model = onnx.load(str(src), load_external_data=True)
    ops: tuple[str, ...] = ("MatMul", "Gather") if gather else ("MatMul",)
    # Only the word embedding table is worth 4 bits (it dominates XLM-R's memory); position and
    # segment tables are small and sensitive.
    keep = [n.name for n in model.graph.node if n.op_type == "Gather" and not _is_word_table(n.name)]
    cfg = mnb.DefaultWeightOnlyQuantConfig(
        block_size=block_size,
        is_symmetric=True,
        accuracy_level=4,
        op_types_to_quantize=ops,
        quant_axes=(("MatMul", 0), ("Gather", 1)),
    )
    with quiet_logs():
        try:
            q = mnb.MatMulNBitsQuantizer(model, algo_config=cfg, op_types_to_quantize=ops, nodes_to_exclude=keep,
                                         quant_axes=(("MatMul", 0), ("Gather", 1)),
                                         block_size=block_size, is_symmetric=True, accuracy_level=4)
            q.process()
        except Exception as e:
            raise ExportError(f"int4 quantization failed: {str(e).strip().splitlines()[0]}") from e
    proto = q.model.model
    _reduce_axes_as_inputs(proto)
    save_model(proto, dst, large=False)
    counts: dict[str, int] = {}
    for n in proto.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return {
        "method": "weight_only",
        "bits": 4,
        "block_size": block_size,
        "symmetric": True,
        "accuracy_level": 4,
        "op_types": list(ops),
        "MatMulNBits": counts.get("MatMulNBits", 0),
        "GatherBlockQuantized": counts.get("GatherBlockQuantized", 0),
    }


_REDUCE_OPS = ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
               "ReduceLogSumExp", "ReduceSumSquare")


def _reduce_axes_as_inputs(proto: Any) -> None:
    """Keep the graph valid when the int4 quantizer raises the opset to 21 (int4 tensors need it):
    from opset 18 the Reduce* ops take ``axes`` as an input, not an attribute. Encoders normalize
    with LayerNormalization and never met this; RMSNorm (Qwen, Llama) traces to ReduceMean."""
    from onnx import helper, numpy_helper

    version = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    if version < 18:
        return
    for node in proto.graph.node:
        if node.op_type not in _REDUCE_OPS:
            continue
        attrs = [a for a in node.attribute if a.name == "axes"]
        if not attrs:
            continue
        axes = list(helper.get_attribute_value(attrs[0]))
        name = f"{node.name or node.output[0]}_axes"
        proto.graph.initializer.append(numpy_helper.from_array(np.asarray(axes, dtype=np.int64), name))
        node.attribute.remove(attrs[0])
        if len(node.input) == 1:
            node.input.append(name)
        else:
            node.input[1] = name


def convert_fp16(src: Path, dst: Path) -> dict[str, Any]:
    """fp16 weights and compute with fp32 inputs/outputs kept (for GPUs)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src), load_external_data=True)
    try:
        half = convert_float_to_float16(model, keep_io_types=True)
    except Exception as e:
        raise ExportError(f"fp16 conversion failed: {str(e).strip().splitlines()[0]}") from e
    save_model(half, dst)
    return {"method": "fp16", "keep_io_types": True}


# --- per-token dynamic int8 ---------------------------------------------------------------------------
# Lower bound of GELU (erf or tanh form): x * Phi(x) >= -0.16997 for every x. Adding it makes a GELU
# output non-negative, so it can use all 256 unsigned levels instead of 128 per sign.
GELU_FLOOR = 0.17


def _is_gelu_output(model: Any, tensor: str) -> bool:
    """Whether ``tensor`` is exactly GELU(h) = 0.5 * h * (1 + erf(h / sqrt 2)), as the TorchScript
    exporter traces it (a tree of Mul nodes), or a fused Gelu node's output. Only then is adding
    GELU_FLOOR sure to leave nothing negative; anything else (a residual added, another scale) keeps
    the symmetric quantization."""
    from onnx import numpy_helper

    producers = {o: n for n in model.graph.node for o in n.output}
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if not i.dims or i.dims == [1]}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)

    def scalar(name: str) -> float | None:
        v = consts.get(name)
        return float(v.reshape(-1)[0]) if v is not None and v.size == 1 else None

    top = producers.get(tensor)
    if top is not None and top.op_type in ("Gelu", "BiasGelu") and top.domain == "com.microsoft":
        return True
    leaves: list[str] = []

    def expand(t: str, depth: int) -> None:
        n = producers.get(t)
        if n is not None and n.op_type == "Mul" and depth < 3:
            for i in n.input:
                expand(i, depth + 1)
        else:
            leaves.append(t)

    expand(tensor, 0)
    factor = 1.0
    others: list[str] = []
    for t in leaves:
        c = scalar(t)
        if c is None:
            others.append(t)
        else:
            factor *= c
    if len(others) != 2 or abs(factor - 0.5) > 1e-6:
        return False
    for one_plus_erf, h in (others, others[::-1]):
        add = producers.get(one_plus_erf)
        if add is None or add.op_type != "Add" or len(add.input) != 2:
            continue
        erf_out = [i for i in add.input if scalar(i) is None]
        if len(erf_out) != 1 or sum(scalar(i) == 1.0 for i in add.input) != 1:
            continue
        erf = producers.get(erf_out[0])
        if erf is None or erf.op_type != "Erf":
            continue
        arg = producers.get(erf.input[0])
        if arg is None or len(arg.input) != 2 or h not in arg.input:
            continue
        c = scalar(arg.input[1] if arg.input[0] == h else arg.input[0])
        if c is not None and ((arg.op_type == "Div" and abs(c - 2**0.5) < 1e-4)
                              or (arg.op_type == "Mul" and abs(c - 2**-0.5) < 1e-4)):
            return True
    return False


def quantize_int8_per_token(src: Path, dst: Path, recipe: dict[str, Any]) -> dict[str, Any]:
    """Per-token dynamic int8: each activation row (token) gets its own scale, computed at run time.

    Static int8 fixes one scale per tensor from calibration data; on the embedder's FFN down
    projection (GELU outputs with a few large values) that cost the worst text's cosine 0.97.
    ONNX Runtime's dynamic int8 computes one scale per whole batch, so a row's result moves with its
    batch-mates. Here every MatMul ``X[.., K] @ W[K, N]`` becomes, in standard ops plus ORT's
    MatMulIntegerToFloat:

        s   = max(|X|, axis=-1) / 127          (one scale per row: it depends on that row alone)
        Xq  = QuantizeLinear(X, s, 128)        (u8, symmetric around the zero point 128)
        Y   = MatMulIntegerToFloat(Xq, Wq, a_scale=s, b_scale=w_scale[N], a_zero_point=128)

    Weights are per output channel, symmetric, ``weight_bits`` wide (7 by default: AVX2's u8 x s8
    kernel adds pairs of products in int16, 2 * 255 * 63 fits, 2 * 255 * 127 does not), so the integer
    product is exact on AVX2 and AVX-512 VNNI alike, and a row's result is the same alone or batched.
    (End to end the vectors still differed between native AVX-512 VNNI and QEMU-emulated AVX2: pooled
    cosine >= 0.9994 on 12 texts, where the static recipe was identical; cause not found yet.)
    (``activation_bits=7`` with 8-bit weights also fits; the record's
    ``exact_on_avx2`` says whether the pair chosen does). A MatMul fed by GELU (``gelu_offset``) quantizes ``X + 0.17`` (never negative)
    unsigned with 256 levels, and the offset's product is taken out of the bias: one more bit.
    The bias Add is kept outside MatMulIntegerToFloat: that kernel multiplies its bias input by a
    non-scalar a_scale too (onnxruntime 1.32).

    Needs no calibration data, so it also works for graphs too large to calibrate.
    """
    import re

    import onnx
    from onnx import helper, numpy_helper

    bits = int(recipe.get("weight_bits", 7))
    act_bits = int(recipe.get("activation_bits", 8))
    if not (2 <= bits <= 8 and 2 <= act_bits <= 8):
        raise ExportError(f"per-token int8: weight_bits and activation_bits must be 2..8, not {bits}, {act_bits}")
    qmax = float(2 ** (bits - 1) - 1)
    # The largest u8 activation times the largest |weight|, twice: VPMADDUBSW's int16 pair sum.
    exact_on_avx2 = 2 * (2**act_bits - 1) * qmax <= 32767
    model = onnx.load(str(src), load_external_data=True)
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    inits = {i.name: i for i in graph.initializer}
    targets = [n for n, _ in _matmul_weight_nodes(model)]
    exclude = set(resolve_exclusions(model, recipe.get("exclude", [])))
    targets = [n for n in targets if n not in exclude
               and len(inits[next(x for x in graph.node if x.name == n).input[1]].dims) == 2]
    want_offset = bool(recipe.get("gelu_offset", True))
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def const(name: str, value: np.ndarray) -> str:
        if name not in inits:
            t = numpy_helper.from_array(value, name)
            graph.initializer.append(t)
            inits[name] = t
        return name

    half = 2 ** (act_bits - 1)
    const("per_token/sym_levels", np.array(half - 1, np.float32))
    const("per_token/u8_levels", np.array(2**act_bits - 1, np.float32))
    const("per_token/eps", np.array(1e-12, np.float32))
    const("per_token/zp_mid", np.array([half], np.uint8))
    const("per_token/zp0", np.array([0], np.uint8))
    const("per_token/gelu_floor", np.array(GELU_FLOOR, np.float32))
    const("per_token/flat", np.array([-1], np.int64))

    def reduce_max(x: str, out: str, name: str) -> Any:
        if opset >= 18:
            axes = const("per_token/axes_last", np.array([-1], np.int64))
            return helper.make_node("ReduceMax", [x, axes], [out], keepdims=1, name=name)
        return helper.make_node("ReduceMax", [x], [out], axes=[-1], keepdims=1, name=name)

    # One quantization per (activation, kind): Q, K and V share their input's.
    quantized: dict[tuple[str, bool], tuple[str, str, str]] = {}
    new_nodes: dict[str, list[Any]] = {}  # target node name -> nodes to insert before it
    offsets = 0
    bias_folded = 0
    for node in list(graph.node):
        if node.name not in targets:
            continue
        x, w_name = node.input[0], node.input[1]
        offset = want_offset and _is_gelu_output(model, x)
        key = (x, offset)
        pre: list[Any] = []
        w = numpy_helper.to_array(inits[w_name]).astype(np.float32)
        if key not in quantized:
            flat_k = const(f"per_token/rows_by_{w.shape[0]}", np.array([-1, w.shape[0]], np.int64))
            tag = re.sub(r"[^0-9A-Za-z_/.]", "_", x) + ("/u8" if offset else "/s")
            src_x = x
            if offset:
                src_x = f"{tag}/shifted"
                pre.append(helper.make_node("Add", [x, "per_token/gelu_floor"], [src_x], name=f"{tag}/shift"))
                pre.append(reduce_max(src_x, f"{tag}/amax", f"{tag}/amax"))
                levels, zp = "per_token/u8_levels", "per_token/zp0"  # no zero point: u8 from 0
            else:
                pre.append(helper.make_node("Abs", [x], [f"{tag}/abs"], name=f"{tag}/abs"))
                pre.append(reduce_max(f"{tag}/abs", f"{tag}/amax", f"{tag}/amax"))
                levels, zp = "per_token/sym_levels", "per_token/zp_mid"
            pre += [
                helper.make_node("Max", [f"{tag}/amax", "per_token/eps"], [f"{tag}/amax_safe"], name=f"{tag}/guard"),
                helper.make_node("Div", [f"{tag}/amax_safe", levels], [f"{tag}/scale"], name=f"{tag}/scale"),
                # QuantizeLinear takes one scale per element of one axis: flatten the rows onto axis 0.
                helper.make_node("Shape", [src_x], [f"{tag}/shape"], name=f"{tag}/shape"),
                helper.make_node("Reshape", [src_x, flat_k], [f"{tag}/x2d"], name=f"{tag}/x2d"),
                helper.make_node("Reshape", [f"{tag}/scale", "per_token/flat"], [f"{tag}/scale1d"],
                                 name=f"{tag}/scale1d"),
            ]
            ql_inputs = [f"{tag}/x2d", f"{tag}/scale1d"]
            if not offset:  # u8 around the middle: one zero point per row (per-axis QuantizeLinear wants that)
                pre += [
                    helper.make_node("Shape", [f"{tag}/scale1d"], [f"{tag}/rows"], name=f"{tag}/rows"),
                    helper.make_node("ConstantOfShape", [f"{tag}/rows"], [f"{tag}/zp1d"], name=f"{tag}/zp1d",
                                     value=numpy_helper.from_array(np.array([half], np.uint8))),
                ]
                ql_inputs.append(f"{tag}/zp1d")
            pre += [
                helper.make_node("QuantizeLinear", ql_inputs, [f"{tag}/q2d"], axis=0, name=f"{tag}/quantize"),
                helper.make_node("Reshape", [f"{tag}/q2d", f"{tag}/shape"], [f"{tag}/q"], name=f"{tag}/q"),
            ]
            quantized[key] = (f"{tag}/q", f"{tag}/scale", zp)
        q, scale, zp = quantized[key]
        w_scale = np.abs(w).max(axis=0) / qmax
        w_scale = np.where(w_scale > 0, w_scale, 1.0).astype(np.float32)
        wq = np.clip(np.round(w / w_scale), -qmax, qmax).astype(np.int8)
        base = node.name
        wq_name = const(f"{base}/Wq", wq)
        ws_name = const(f"{base}/w_scale", w_scale)
        out = node.output[0]
        mm = helper.make_node("MatMulIntegerToFloat", [q, wq_name, scale, ws_name, zp], [out],
                              domain="com.microsoft", name=f"{base}/per_token")
        post: list[Any] = [mm]
        if offset:
            # (X + c) @ Wd = X @ Wd + c * colsum(Wd): subtract the second term, from the bias when the
            # MatMul feeds a lone bias Add, else with an Add of its own.
            offsets += 1
            corr = (-GELU_FLOOR * (wq.astype(np.float64) * w_scale.astype(np.float64)).sum(axis=0)).astype(np.float32)
            users = consumers.get(out, [])
            bias = None
            if len(users) == 1 and users[0].op_type == "Add":
                other = [i for i in users[0].input if i != out]
                if len(other) == 1 and other[0] in inits and list(inits[other[0]].dims) == [w.shape[1]]:
                    used_elsewhere = sum(other[0] in n.input for n in graph.node) > 1
                    if not used_elsewhere:
                        bias = inits[other[0]]
            if bias is not None:
                b = numpy_helper.to_array(bias).astype(np.float32)
                bias.CopyFrom(numpy_helper.from_array((b.astype(np.float64) + corr).astype(np.float32), bias.name))
                bias_folded += 1
            else:
                raw = f"{base}/per_token_raw"
                mm.output[0] = raw
                post.append(helper.make_node("Add", [raw, const(f"{base}/offset_corr", corr)], [out],
                                             name=f"{base}/offset_corr"))
        new_nodes[node.name] = pre + post
    # Rebuild the node list with each target replaced by its subgraph (graph order kept topological).
    rebuilt: list[Any] = []
    for n in graph.node:
        if n.name in new_nodes:
            rebuilt.extend(new_nodes[n.name])
        else:
            rebuilt.append(n)
    del graph.node[:]
    graph.node.extend(rebuilt)
    used = {i for n in graph.node for i in n.input}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    gathers = [n.name for n in graph.node if n.op_type == "Gather" and _is_word_table(n.name)]
    want_gather = "Gather" in recipe.get("op_types", []) and bool(gathers)
    target = dst.with_name(dst.name + ".matmuls") if want_gather else dst
    save_model(model, target)
    inits.clear()
    model.Clear()  # the graph can be 2 GB: free it before the Gather pass loads its own copy
    if want_gather:
        # Weight-only int8 word-embedding table (ORT's dynamic quantizer: a Gather of int8 rows then
        # dequantized); per row of the table, so batch-invariant too.
        from onnxruntime.quantization import QuantType, quantize_dynamic

        try:
            with quiet_logs():
                quantize_dynamic(str(target), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["Gather"],
                                 nodes_to_quantize=gathers, use_external_data_format=False,
                                 extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        except OSError:
            raise
        except Exception as e:
            raise ExportError(f"int8 word-embedding quantization failed: {str(e).strip().splitlines()[0]}") from e
        finally:
            for p in (target, target.with_name(target.name + ".data")):
                p.unlink(missing_ok=True)
    applied = dict(recipe)
    applied["quantized_gathers"] = gathers if want_gather else []
    applied["excluded_nodes"] = sorted(exclude)
    applied["quantized_matmuls"] = len(targets)
    applied["gelu_offset_matmuls"] = offsets
    applied["gelu_offset_bias_folded"] = bias_folded
    applied["exact_on_avx2"] = exact_on_avx2
    return applied

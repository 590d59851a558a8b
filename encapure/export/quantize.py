"""Precision recipes: int8 (dynamic, weights), int4 (MatMulNBits weight-only), fp16.

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


def int8_recipe(task: str, model_type: str, *, large: bool = False) -> dict[str, Any]:
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
    """
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

"""Precision recipes: int8 (dynamic, weights), int4 (MatMulNBits weight-only), fp16.

The int8 recipe is chosen per task from measurements on this AVX2 CPU (see scripts/measure_export.py
and the closing note of issue 2): which MatMuls stay fp32, per-channel or per-tensor, signedness.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from encapure.errors import ExportError
from encapure.export.onnx_export import save_model


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


def int8_recipe(task: str, model_type: str) -> dict[str, Any]:
    """The int8 recipe per task (see module docstring for how it was chosen)."""
    return {
        "method": "dynamic",
        "weight_type": "QInt8",
        "per_channel": True,
        "reduce_range": False,
        "op_types": ["MatMul"],
        "exclude": [],
    }


def quantize_int8(src: Path, dst: Path, recipe: dict[str, Any]) -> dict[str, Any]:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(src))
    nodes = _matmul_weight_nodes(model)
    exclude = resolve_exclusions(model, recipe.get("exclude", []))
    with quiet_logs():
        try:
            quantize_dynamic(
                str(src),
                str(dst),
                weight_type=QuantType.QInt8 if recipe["weight_type"] == "QInt8" else QuantType.QUInt8,
                per_channel=bool(recipe["per_channel"]),
                reduce_range=bool(recipe["reduce_range"]),
                op_types_to_quantize=list(recipe["op_types"]),
                nodes_to_exclude=exclude,
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT, "MatMulConstBOnly": True},
            )
        except OSError:
            raise
        except Exception as e:
            raise ExportError(f"int8 quantization failed: {str(e).strip().splitlines()[0]}") from e
    applied = dict(recipe)
    applied["excluded_nodes"] = exclude
    applied["quantized_matmuls"] = len(nodes) - len([n for n, _ in nodes if n in set(exclude)])
    return applied


def resolve_exclusions(model: Any, rules: list[str]) -> list[str]:
    """Node names matching exclusion rules (substring of the node name, or 'matmul:<substring>')."""
    names = [n for n, _ in _matmul_weight_nodes(model)]
    out: list[str] = []
    for rule in rules:
        key = rule.split(":", 1)[1] if rule.startswith("matmul:") else rule
        out.extend(n for n in names if key in n and n not in out)
    return out


def quantize_int4(src: Path, dst: Path, *, block_size: int = 32, gather: bool = True) -> dict[str, Any]:
    """4-bit weight-only MatMuls (MatMulNBits); the word embedding Gather too when asked."""
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mnb

    model = onnx.load(str(src), load_external_data=True)
    ops: tuple[str, ...] = ("MatMul", "Gather") if gather else ("MatMul",)
    cfg = mnb.DefaultWeightOnlyQuantConfig(
        block_size=block_size,
        is_symmetric=True,
        accuracy_level=4,
        op_types_to_quantize=ops,
        quant_axes=(("MatMul", 0), ("Gather", 1)),
    )
    with quiet_logs():
        try:
            q = mnb.MatMulNBitsQuantizer(model, algo_config=cfg, op_types_to_quantize=ops,
                                         quant_axes=(("MatMul", 0), ("Gather", 1)),
                                         block_size=block_size, is_symmetric=True, accuracy_level=4)
            q.process()
        except Exception as e:
            raise ExportError(f"int4 quantization failed: {str(e).strip().splitlines()[0]}") from e
    proto = q.model.model
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

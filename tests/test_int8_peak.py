"""FLOP counting of scripts/int8_peak.py (the headroom figure is only as right as this count)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import ModelProto, TensorProto, helper, numpy_helper  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("int8_peak", ROOT / "scripts" / "int8_peak.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["int8_peak"] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


peak = _script()

HIDDEN, HEADS = 16, 2
HEAD_DIM = HIDDEN // HEADS
IN = 8


def tiny_attention() -> ModelProto:
    """x[batch, sequence, 8] -> int8 (QDQ) projection to 16 -> 2 heads of 8 -> QK^T and AV in fp32.

    The head split reshapes with 0 ("copy this dim") as exporters do, so the head MatMuls' shapes
    depend on the symbolic batch and sequence dims the counter has to resolve.
    """
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.integers(-64, 64, (IN, HIDDEN), dtype=np.int8), "w_q"),
        numpy_helper.from_array(np.full(HIDDEN, 0.01, np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros(HIDDEN, np.int8), "w_zp"),
        numpy_helper.from_array(np.array([0, 0, HEADS, HEAD_DIM], np.int64), "heads_shape"),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w"], axis=1),
        helper.make_node("MatMul", ["x", "w"], ["proj"], name="proj"),  # [B, S, 16]
        helper.make_node("Reshape", ["proj", "heads_shape"], ["split"]),  # [B, S, 2, 8]
        helper.make_node("Transpose", ["split"], ["q"], perm=[0, 2, 1, 3]),  # [B, 2, S, 8]
        helper.make_node("Transpose", ["split"], ["kt"], perm=[0, 2, 3, 1]),  # [B, 2, 8, S]
        helper.make_node("MatMul", ["q", "kt"], ["scores"], name="qk"),  # [B, 2, S, S]
        helper.make_node("Softmax", ["scores"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "q"], ["ctx"], name="av"),  # [B, 2, S, 8]
    ]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", IN])],
        [helper.make_tensor_value_info("ctx", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_counts_projection_and_attention_matmuls() -> None:
    b, s = 3, 5
    costs = {c.name: c for c in peak.matmul_costs(tiny_attention(), {"batch": b, "sequence": s})}
    assert set(costs) == {"proj", "qk", "av"}
    assert costs["proj"].flops == 2 * b * s * IN * HIDDEN
    assert costs["qk"].flops == 2 * b * HEADS * s * s * HEAD_DIM
    assert costs["av"].flops == 2 * b * HEADS * s * HEAD_DIM * s
    # Only the MatMul fed by DequantizeLinear runs as an integer GEMM.
    assert costs["proj"].int8 and not costs["qk"].int8 and not costs["av"].int8


def test_per_sequence_is_linear_plus_quadratic_in_length() -> None:
    counter = peak.FlopCounter(tiny_attention())
    for s in (1, 7, 64):
        i8, f32 = counter.per_sequence(s)
        assert i8 == 2 * s * IN * HIDDEN
        assert f32 == 4 * HEADS * s * s * HEAD_DIM
    assert counter.total([7, 7, 64]) == tuple(
        2 * a + b for a, b in zip(counter.per_sequence(7), counter.per_sequence(64), strict=True))


@pytest.mark.parametrize("int8", [True, False])
def test_peak_gemm_graph_counts_as_its_gemm(int8: bool) -> None:
    m, k, n = 64, 32, 48
    (cost,) = peak.matmul_costs(peak.gemm_model(m, k, n, int8=int8), {})
    assert cost.flops == 2 * m * k * n
    assert cost.int8 is int8


def test_unresolved_shape_is_an_error_not_zero() -> None:
    with pytest.raises(ValueError, match="shapes not inferred"):
        peak.matmul_costs(tiny_attention(), {"batch": 2})  # sequence left symbolic

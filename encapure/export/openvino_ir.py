"""``--format openvino``: the fp32 ONNX graph converted to OpenVINO IR, weights compressed by NNCF.

Why a second format: weight-only int4/int8 (NNCF ``compress_weights``) is what makes a 568M-parameter
XLM-R reranker (bge-reranker-v2-m3) small: the OpenVINO CPU plugin runs int4-grouped weights
directly (decompressing per tile), where ONNX Runtime's MatMulNBits path is slower on CPU and keeps
fp32 embeddings. Only the OpenVINO backend runs an IR (``model.xml`` + ``model.bin``).

Recipes (``precision``):
- ``int4``: INT4_SYM, group 128, ratio 1.0, ``all_layers=True`` (the 256M-parameter word embedding is
  int4 too: it is a Gather, only the looked-up rows are decompressed); 280 MB for bge-reranker-v2-m3.
- ``int8``, rerankers and classifiers: INT8_ASYM per output channel, weight-only (activations stay
  f32, so scores do not depend on batch-mates).
- ``int8``, embedders: NNCF static int8 (``nncf.quantize``, transformer preset: SmoothQuant 0.95,
  per-tensor asymmetric u8 activations with constant scales, per-channel s8 weights) with the FFN
  down projections of the first third of the layers kept f32, calibrated on the shipped set (or
  ``--calibration``) one text per batch, so no padding position widens a range. Constant scales make
  it batch-invariant: on all-MiniLM-L6-v2 a text embedded alone and inside a padded batch gave
  identical vectors (max |delta| 0.0). The FFN down projection's input, the GELU output, has a few
  channels far wider than the rest, and one scale per tensor leaves the others a handful of levels;
  the error an early layer makes is carried through every later one. all-MiniLM-L6-v2 (6 layers),
  worst-text cosine to sentence-transformers on the 304 mixed texts / seconds for 1,000 WikiQA texts
  as a ratio to ONNX Runtime fp32 (AMD EPYC AVX-512 VNNI, 2 single-thread workers, one quiet run):
  every down projection int8 0.9898 / 2.48x; all six f32 0.9968 / 1.64x; layer 0's alone 0.9936 /
  2.30x; layers 0-1 (the first third) **0.9952 / 2.05x**; layers 0-2 0.9965 / 1.94x; one later
  layer alone (3, 4 or 5) 0.9899-0.9905. experiments/ov_int8_embedder.py holds the search.
- ``fp32``: plain conversion (weights kept f32, not the f16 ``save_model`` applies by default).
NNCF is an export-time dependency only (the ``export`` extra); serving needs just ``openvino``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from encapure.errors import ExportError

IR_FILE = "model.xml"
IR_WEIGHTS = "model.bin"
FORMATS = ("onnx", "openvino")
IR_PRECISIONS = ("fp32", "int8", "int4")
INT4_GROUP = 128
# Share of the compressible weights that get int4 (the rest int8 per channel, NNCF picks which by
# weight-quantization error). scripts/measure_bge_memory.py patches it to measure other recipes.
INT4_RATIO = 1.0
# Embedders at int8: NNCF static int8 with the FFN down projections (this pattern, matched with re.match
# against OpenVINO's node names, which keep the TorchScript exporter's ONNX names) of the first
# EMBED_PTQ_F32_SHARE of the layers (rounded up) kept f32.
EMBED_PTQ_FFN_DOWN = r".*layer\.(\d+)/output/dense/MatMul$"
EMBED_PTQ_F32_SHARE = 1 / 3
EMBED_PTQ_SMOOTH_QUANT = 0.95
# Per precision, enters the export cache key of IR formats (hub.cache_key): bump a precision's entry when
# its recipe changes, so a cached IR made by the old recipe is not served, while the others' caches stay
# valid. "1" (the default) keys as before versions existed. int8 2: embedders keep only the first third's
# FFN down projections f32.
IR_RECIPE_VERSIONS: dict[str, str] = {"int8": "2"}


def ir_recipe_version(precision: str) -> str:
    return IR_RECIPE_VERSIONS.get(precision, "1")


def ir_recipe_tag(precision: str) -> str:
    """The suffix that keys a cached IR of ``precision`` ("" for version 1, so old caches keep their names)."""
    version = ir_recipe_version(precision)
    return "" if version == "1" else f"ir{version}"

Feeds = list[dict[str, Any]]


def recipe(precision: str, task: str = "rerank") -> dict[str, Any]:
    """What ``convert`` applies for ``precision`` and ``task``, as recorded in the manifest's ``quantization``."""
    if precision == "int8" and task == "embed":
        return {"format": "openvino", "method": "nncf_ptq", "model_type": "transformer", "preset": "mixed",
                "smooth_quant_alpha": EMBED_PTQ_SMOOTH_QUANT, "f32_ffn_down_share": round(EMBED_PTQ_F32_SHARE, 4),
                "calibration_batch_size": 1}
    if precision == "int4":
        return {"format": "openvino", "method": "nncf_weights", "mode": "int4_sym", "group_size": INT4_GROUP,
                "ratio": INT4_RATIO, "all_layers": True}
    if precision == "int8":
        return {"format": "openvino", "method": "nncf_weights", "mode": "int8_asym", "group_size": -1}
    if precision == "fp32":
        return {"format": "openvino", "method": "none"}
    raise ExportError(f"--format openvino supports precision {', '.join(IR_PRECISIONS)}, not {precision!r}")


def convert(
    fp32_onnx: Path,
    out_xml: Path,
    precision: str,
    *,
    task: str = "rerank",
    calibration: Callable[[], Feeds] | None = None,
) -> dict[str, Any]:
    """Convert ``fp32_onnx`` to IR at ``out_xml`` (and its ``.bin``), compressing per ``recipe``.

    ``calibration`` gives the static recipe's batches (one text each, see ``recipe``); it is called
    only when the recipe is static.
    """
    spec = recipe(precision, task)
    try:
        import openvino as ov
    except ImportError as e:
        raise ExportError("--format openvino needs openvino: pip install 'encapure[openvino,export]'") from e
    model = ov.convert_model(str(fp32_onnx))
    if spec["method"] != "none":
        try:
            import nncf
        except ImportError as e:
            raise ExportError("--format openvino at int4/int8 needs nncf: pip install 'encapure[export]'") from e
        import logging

        logging.getLogger("nncf").setLevel(logging.ERROR)  # its progress bars/info lines drown our progress
    if spec["method"] == "nncf_ptq":
        if calibration is None:
            raise ExportError("static int8 (--format openvino) needs calibration batches")
        model = _quantize_static(model, spec, calibration())
        spec["nncf"] = str(nncf.__version__)
    elif spec["method"] == "nncf_weights":
        kw: dict[str, Any] = {}
        if spec["mode"] == "int4_sym":
            kw = {"mode": nncf.CompressWeightsMode.INT4_SYM, "group_size": spec["group_size"],
                  "ratio": spec["ratio"], "all_layers": spec["all_layers"]}
        else:
            kw = {"mode": nncf.CompressWeightsMode.INT8_ASYM}
        model = nncf.compress_weights(model, **kw)
        spec["nncf"] = str(nncf.__version__)
    ov.save_model(model, str(out_xml), compress_to_fp16=False)
    spec["openvino"] = str(ov.__version__)
    return spec



def f32_ffn_downs(matmuls: list[str], share: float) -> list[str]:
    """The FFN down projections among ``matmuls`` (node names) of the first ``share`` of the layers,
    rounded up: those the embedder recipe keeps f32."""
    layers: dict[int, list[str]] = {}
    for name in matmuls:
        m = re.match(EMBED_PTQ_FFN_DOWN, name)
        if m:
            layers.setdefault(int(m.group(1)), []).append(name)
    if not layers:
        return []
    count = math.ceil(len(layers) * share)
    return [n for i in sorted(layers)[:count] for n in layers[i]]


def _quantize_static(model: Any, spec: dict[str, Any], feeds: Feeds) -> Any:
    """NNCF post-training quantization (int8 weights and activations, constant scales) of ``model``;
    records in ``spec`` how many calibration batches were used and which MatMuls stayed f32."""
    import nncf
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        AdvancedSmoothQuantParameters,
    )

    if not feeds:
        raise ExportError("static int8 needs calibration batches")
    names = [op.get_friendly_name() for op in model.get_ops() if op.get_type_name() == "MatMul"]
    kept = f32_ffn_downs(names, float(spec["f32_ffn_down_share"]))
    adv = AdvancedQuantizationParameters(
        smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=float(spec["smooth_quant_alpha"])))
    # An architecture with no FFN down projection named as EMBED_PTQ_FFN_DOWN expects is quantized whole
    # (kept is empty; recorded below).
    ignored = nncf.IgnoredScope(names=kept, validate=False)
    try:
        quantized = nncf.quantize(model, nncf.Dataset(feeds), subset_size=len(feeds),
                                  model_type=nncf.ModelType.TRANSFORMER, preset=nncf.QuantizationPreset.MIXED,
                                  ignored_scope=ignored, advanced_parameters=adv)
    except Exception as e:
        raise ExportError(f"static int8 (NNCF) failed: {str(e).strip().splitlines()[0]}") from e
    spec["calibration_batches"] = len(feeds)
    spec["f32_matmuls"] = kept
    return quantized

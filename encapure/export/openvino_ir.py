"""``--format openvino``: the fp32 ONNX graph converted to OpenVINO IR, weights compressed by NNCF.

Why a second format: weight-only int4/int8 (NNCF ``compress_weights``) is what makes a 568M-parameter
XLM-R reranker (bge-reranker-v2-m3) small: the OpenVINO CPU plugin runs int4-grouped weights
directly (decompressing per tile), where ONNX Runtime's MatMulNBits path is slower on CPU and keeps
fp32 embeddings. Only the OpenVINO backend runs an IR (``model.xml`` + ``model.bin``).

Recipes (``precision``):
- ``int4``: INT4_SYM, group 128, ratio 1.0, ``all_layers=True`` (the 256M-parameter word embedding is
  int4 too: it is a Gather, only the looked-up rows are decompressed); 280 MB for bge-reranker-v2-m3.
- ``int8``: INT8_ASYM per output channel, weight-only (activations stay f32, so scores do not
  depend on batch-mates).
- ``fp32``: plain conversion (weights kept f32, not the f16 ``save_model`` applies by default).
NNCF is an export-time dependency only (the ``export`` extra); serving needs just ``openvino``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from encapure.errors import ExportError

IR_FILE = "model.xml"
IR_WEIGHTS = "model.bin"
FORMATS = ("onnx", "openvino")
IR_PRECISIONS = ("fp32", "int8", "int4")
INT4_GROUP = 128


def recipe(precision: str) -> dict[str, Any]:
    """What ``convert`` applies for ``precision``, as recorded in the manifest's ``quantization``."""
    if precision == "int4":
        return {"format": "openvino", "method": "nncf_weights", "mode": "int4_sym", "group_size": INT4_GROUP,
                "ratio": 1.0, "all_layers": True}
    if precision == "int8":
        return {"format": "openvino", "method": "nncf_weights", "mode": "int8_asym", "group_size": -1}
    if precision == "fp32":
        return {"format": "openvino", "method": "none"}
    raise ExportError(f"--format openvino supports precision {', '.join(IR_PRECISIONS)}, not {precision!r}")


def convert(fp32_onnx: Path, out_xml: Path, precision: str) -> dict[str, Any]:
    """Convert ``fp32_onnx`` to IR at ``out_xml`` (and its ``.bin``), compressing weights per ``recipe``."""
    spec = recipe(precision)
    try:
        import openvino as ov
    except ImportError as e:
        raise ExportError("--format openvino needs openvino: pip install 'encapure[openvino,export]'") from e
    model = ov.convert_model(str(fp32_onnx))
    if spec["method"] == "nncf_weights":
        try:
            import nncf
        except ImportError as e:
            raise ExportError("--format openvino at int4/int8 needs nncf: pip install 'encapure[export]'") from e
        import logging

        logging.getLogger("nncf").setLevel(logging.ERROR)  # its progress bars/info lines drown our progress
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


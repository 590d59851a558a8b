"""Graph fusion with ONNX Runtime's transformer optimizer, only where it measured faster.

On this AVX2 CPU ORT's own session-time optimizations already fuse LayerNorm/GELU; the offline
BERT fusion (Attention/SkipLayerNorm/BiasGelu contrib ops) measured *slower* for some precisions,
so "auto" applies it only where scripts/measure_export.py found a gain (see FUSE_WHEN_AUTO).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from encapure.errors import ExportError

# Families the ORT "bert" optimizer understands.
_BERT_LIKE = {"bert", "roberta", "xlm-roberta", "camembert", "distilbert", "electra", "mpnet"}
# (precision) -> fuse in "auto" mode; decided from measurements (see module docstring).
FUSE_WHEN_AUTO: dict[str, bool] = {"fp32": False, "fp16": True, "int8": False, "int4": False}


def should_fuse(model_type: str, precision: str, mode: str) -> bool:
    if mode == "off" or model_type not in _BERT_LIKE:
        return False
    if mode == "on":
        return True
    return FUSE_WHEN_AUTO.get(precision, False)


def fuse(src: Path, dst: Path, config: dict[str, Any], model_type: str) -> dict[str, int]:
    """Fuse attention/LayerNorm/GELU; returns fused operator counts (empty when nothing fused)."""
    from onnxruntime.transformers.optimizer import optimize_model

    from encapure.export.onnx_export import save_model

    opt_type = "bert"
    try:
        optimized = optimize_model(
            str(src),
            model_type=opt_type,
            num_heads=int(config.get("num_attention_heads") or 0),
            hidden_size=int(config.get("hidden_size") or 0),
            opt_level=0,
            use_gpu=False,
        )
        stats = {k: int(v) for k, v in optimized.get_fused_operator_statistics().items() if v}
    except Exception as e:
        raise ExportError(f"graph optimization failed: {str(e).strip().splitlines()[0]}") from e
    model = optimized.model
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        from onnx import helper

        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    save_model(model, dst)
    return stats

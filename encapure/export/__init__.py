"""Model preparation: Hugging Face model -> optimized, quantized ONNX + tokenizer.json + encapure.json.

Needs the ``export`` extra (torch, transformers, onnx); those are imported only when exporting.
"""

from __future__ import annotations

from encapure.export.core import EXPORT_VERSION, PRECISIONS, ExportResult, export_model

__all__ = ["EXPORT_VERSION", "PRECISIONS", "ExportResult", "export_model"]

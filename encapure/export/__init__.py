"""Model preparation: Hugging Face model -> optimized, quantized ONNX + tokenizer.json + encapure.json.

Needs the ``export`` extra (torch, transformers, onnx); those are imported only when exporting.
The names below load ``encapure.export.core`` on first use (PEP 562), not on ``import encapure.export``:
every CLI start imports ``encapure.export.cli`` to register its subcommand, and core's imports
(onnx helpers, parity, ColBERT) cost a server start ~170 ms it never uses (``python -X importtime``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from encapure.export.core import EXPORT_VERSION, PRECISIONS, ExportResult, export_model

__all__ = ["EXPORT_VERSION", "PRECISIONS", "ExportResult", "export_model"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from encapure.export import core

        return getattr(core, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

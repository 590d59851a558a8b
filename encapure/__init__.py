"""Encapure: fast reranking and text embeddings on ONNX Runtime.

Names are imported lazily so ``import encapure`` stays cheap (the CLI and the server start fast,
and the serving install never touches the export extra's torch).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Reranker": "encapure.engine",
    "Embedder": "encapure.engine",
    "Classifier": "encapure.engine",
    "load_model": "encapure.engine",
    "maxsim": "encapure.engine",
    "AsyncReranker": "encapure.scheduler",
    "AsyncEmbedder": "encapure.scheduler",
    "AsyncClassifier": "encapure.scheduler",
    "Scheduler": "encapure.scheduler",
    "Settings": "encapure.settings",
    "export_model": "encapure.export",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'encapure' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)

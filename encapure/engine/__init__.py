"""The inference engine: tokenize -> batched ONNX Runtime run -> post-process."""

from __future__ import annotations

from encapure.engine.api import Classifier, Embedder, Reranker
from encapure.engine.batching import plan_batches
from encapure.engine.colbert import ColbertModel, maxsim
from encapure.engine.loading import load_model
from encapure.engine.model import OnnxModel
from encapure.engine.types import (
    ClassifyOutput,
    EmbedOutput,
    InferenceModel,
    MultiVectorOutput,
    Prepared,
    RerankOutput,
    RerankResult,
    Unit,
)

__all__ = [
    "Classifier",
    "ClassifyOutput",
    "ColbertModel",
    "EmbedOutput",
    "Embedder",
    "InferenceModel",
    "MultiVectorOutput",
    "OnnxModel",
    "Prepared",
    "RerankOutput",
    "RerankResult",
    "Reranker",
    "Unit",
    "load_model",
    "maxsim",
    "plan_batches",
]

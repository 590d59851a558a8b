"""The contract between model preparation and the engine: ``encapure.json``.

``encapure export`` writes it; the engine loads exactly this and nothing else decides how a
model is run. Plain dataclasses so it is cheap to load and trivially serializable.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from encapure.errors import ManifestError

MANIFEST_NAME = "encapure.json"
PARITY_NAME = "parity.json"  # the export's parity report beside the manifest
FORMAT_VERSION = 1

Task = Literal["rerank", "embed", "classify"]
Pooling = Literal["cls", "mean", "max", "last"]
Activation = Literal["sigmoid", "softmax", "none"]
# What the graph's output is: per-item logits, per-token hidden states to pool, or an
# already pooled sentence embedding (some third-party ONNX files), or per-token vectors that are
# the result themselves (ColBERT: projected and L2-normalized; see ``colbert`` below).
OutputKind = Literal["logits", "token_embeddings", "sentence_embedding", "multi_vector"]


@dataclass
class Manifest:
    task: Task
    precision: str  # fp32 | fp16 | int8 | int4 (or "unknown" for third-party files)
    max_length: int
    input_names: list[str]  # subset of input_ids, attention_mask, token_type_ids (graph order)
    output_name: str
    output_kind: OutputKind
    model_file: str = "model.onnx"
    tokenizer_file: str = "tokenizer.json"
    # "sentencepiece": the exporter checked that encapure.engine.spm_tokenizer reproduces tokenizer.json
    # (and copied sentencepiece.bpe.model); "" = tokenizers only.
    tokenizer: str = ""
    pooling: Pooling | None = None  # embed only
    normalize: bool = False  # embed only
    labels: list[str] | None = None  # classify (and rerank: one label)
    score_activation: Activation = "none"
    query_prefix: str | None = None
    document_prefix: str | None = None
    # Instruction-following pair scorers (Qwen3-Reranker): {"prefix", "body", "suffix", "instruction"};
    # the body holds {instruction}, {query} and {document}, "instruction" is the default one.
    prompt_template: dict[str, str] | None = None
    pad_token_id: int = 0
    embedding_dim: int | None = None
    source: str = ""  # hub id or path the model came from
    architecture: str = ""  # e.g. BertForSequenceClassification
    model_type: str = ""  # e.g. bert, xlm-roberta
    fusions: dict[str, int] = field(default_factory=dict)  # fused op counts; empty = not optimized
    quantization: dict[str, Any] = field(default_factory=dict)  # recipe actually applied
    tool_versions: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    # Late interaction (ColBERT): marker ids, query/document lengths, query expansion, skip-list ids.
    # Read by encapure.engine.colbert; None for every other model.
    colbert: dict[str, Any] | None = None
    format_version: int = FORMAT_VERSION

    # --- I/O ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / MANIFEST_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n", encoding="utf-8")
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        known = {f.name for f in dataclasses.fields(cls)}
        missing = [f.name for f in dataclasses.fields(cls) if f.name in _REQUIRED and f.name not in data]
        if missing:
            raise ManifestError(f"manifest lacks required fields: {', '.join(missing)}")
        version = data.get("format_version", FORMAT_VERSION)
        if version > FORMAT_VERSION:
            raise ManifestError(
                f"manifest format {version} is newer than this Encapure understands ({FORMAT_VERSION}); upgrade"
            )
        m = cls(**{k: v for k, v in data.items() if k in known})
        m.validate()
        return m

    @classmethod
    def load(cls, folder: str | Path) -> Manifest:
        path = Path(folder) / MANIFEST_NAME
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise ManifestError(f"no {MANIFEST_NAME} in {folder}: not an Encapure model folder") from e
        except (OSError, json.JSONDecodeError) as e:
            raise ManifestError(f"cannot read {path}: {e}") from e
        return cls.from_dict(data)

    def validate(self) -> None:
        if self.task not in ("rerank", "embed", "classify"):
            raise ManifestError(f"unknown task {self.task!r}")
        if self.task == "embed" and self.output_kind == "token_embeddings" and self.pooling is None:
            raise ManifestError("an embedding model with token outputs needs a pooling mode")
        if self.output_kind == "multi_vector" and not self.colbert:
            raise ManifestError("a multi_vector model needs its colbert settings (markers, lengths)")
        if "input_ids" not in self.input_names:
            raise ManifestError("the model must take input_ids")
        if self.max_length <= 0:
            raise ManifestError("max_length must be positive")
        if self.prompt_template is not None:
            t = self.prompt_template
            missing = [k for k in ("prefix", "body", "suffix", "instruction") if not isinstance(t.get(k), str)]
            if missing or self.task != "rerank":
                raise ManifestError(f"prompt_template needs a rerank task and string fields {missing or ''}".strip())
            if not str(t["body"]).endswith("{document}") or "{query}" not in str(t["body"]):
                raise ManifestError("prompt_template body must hold {query} and end with {document}")

    # --- integrity ------------------------------------------------------------------------
    def compute_files(self, folder: str | Path, names: list[str]) -> None:
        """Record sha256 of the given files (relative to folder)."""
        self.files = {n: sha256_file(Path(folder) / n) for n in sorted(names)}

    def verify_files(self, folder: str | Path) -> list[str]:
        """Names of files whose hash does not match (slow for big models: call explicitly)."""
        return [n for n, h in self.files.items() if sha256_file(Path(folder) / n) != h]


_REQUIRED = {"task", "precision", "max_length", "input_names", "output_name", "output_kind"}


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()

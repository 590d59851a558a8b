"""What a model folder is: task, pooling, normalization, labels and max length.

Reads only JSON files (no torch), so ``encapure export --help``-time checks and the CLI's early
errors stay cheap. The rules follow what users of Hugging Face and sentence-transformers expect:
``*ForSequenceClassification`` with one label is a reranker, with more a classifier; anything else
is an embedding model pooled the way its sentence-transformers modules say (CLS when they are absent).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from encapure.errors import ExportError, UnsupportedModelError

TASKS = ("auto", "rerank", "embed", "classify")

# Families whose position ids start after the padding index (RoBERTa style): usable positions are
# max_position_embeddings - (pad_token_id + 1).
_PADDING_OFFSET_TYPES = {"roberta", "xlm-roberta", "camembert", "xlm-roberta-xl", "longformer", "mpnet"}

# Architectures whose graphs cannot serve as encoders here (generation heads, vision, audio).
_UNEXPORTABLE_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration", "ForImageClassification",
                          "ForAudioClassification", "ForCTC", "ForSpeechSeq2Seq", "ForVision2Seq")

_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "sentencepiece.bpe.model", "spiece.model",
                    "vocab.json", "tokenizer.model", "spm.model")


@dataclass
class SourceInfo:
    """Everything the exporter decides before loading weights."""

    task: str  # rerank | embed | classify
    model_dir: Path | None  # folder holding config.json + weights (None for in-memory models)
    config: dict[str, Any]
    architecture: str
    model_type: str
    labels: list[str] | None
    pooling: str | None
    normalize: bool
    max_length: int
    score_activation: str
    query_prefix: str | None = None
    document_prefix: str | None = None
    prompt_template: dict[str, str] | None = None  # LLM yes/no rerankers (encapure.export.qwen3)
    decoder: bool = False  # a decoder-only LM (Qwen3/Qwen2) exported by encapure.export.qwen3
    notes: list[str] = field(default_factory=list)


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise ExportError(f"{path} is not a JSON object")
    return data


def find_model_dir(folder: Path) -> Path:
    """The folder holding config.json: the root, or a sentence-transformers Transformer module."""
    if not folder.is_dir():
        raise UnsupportedModelError(f"{folder} is not a folder")
    if (folder / "config.json").is_file():
        return folder
    modules = folder / "modules.json"
    if modules.is_file():
        try:
            entries = json.loads(modules.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise UnsupportedModelError(f"cannot read {modules}: {e}") from e
        for entry in entries:
            if str(entry.get("type", "")).endswith("Transformer"):
                sub = folder / str(entry.get("path", ""))
                if (sub / "config.json").is_file():
                    return sub
    raise UnsupportedModelError(
        f"{folder} is not a model folder: no config.json (expected a Hugging Face model folder or hub id)"
    )


def has_tokenizer(folder: Path) -> bool:
    return any((folder / n).is_file() for n in _TOKENIZER_FILES)


def _st_modules(root: Path) -> list[dict[str, Any]]:
    path = root / "modules.json"
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return []
    return data if isinstance(data, list) else []


def st_pooling_and_normalize(root: Path) -> tuple[str | None, bool]:
    """Pooling mode and normalization from sentence-transformers modules (None when absent)."""
    modules = _st_modules(root)
    pooling: str | None = None
    normalize = False
    for entry in modules:
        kind = str(entry.get("type", ""))
        if kind.endswith("Normalize"):
            normalize = True
        if kind.endswith("Pooling"):
            cfg_path = root / str(entry.get("path", "")) / "config.json"
            cfg = read_json(cfg_path) if cfg_path.is_file() else {}
            pooling = _pooling_from_st(cfg)
    if pooling is None and (root / "1_Pooling" / "config.json").is_file():
        pooling = _pooling_from_st(read_json(root / "1_Pooling" / "config.json"))
    return pooling, normalize


def _pooling_from_st(cfg: dict[str, Any]) -> str:
    mode = cfg.get("pooling_mode")
    if isinstance(mode, str):
        return {"cls": "cls", "mean": "mean", "max": "max", "lasttoken": "last"}.get(mode, "mean")
    if cfg.get("pooling_mode_cls_token"):
        return "cls"
    if cfg.get("pooling_mode_max_tokens"):
        return "max"
    if cfg.get("pooling_mode_lasttoken"):
        return "last"
    if cfg.get("pooling_mode_mean_tokens") or cfg.get("pooling_mode_mean_sqrt_len_tokens"):
        return "mean"
    return "mean"


def position_limit(config: dict[str, Any]) -> int | None:
    """How many tokens the position embeddings can address."""
    mpe = config.get("max_position_embeddings")
    if not isinstance(mpe, int) or mpe <= 0:
        return None
    if config.get("model_type") in _PADDING_OFFSET_TYPES:
        pad = config.get("pad_token_id")
        offset = (pad if isinstance(pad, int) else 1) + 1
        return mpe - offset
    return mpe


def check_max_length(explicit: int, limit: int | None) -> int:
    """A ``--max-length`` the model's positions can hold, or an ``ExportError`` saying why not."""
    if explicit <= 0:
        raise ExportError(f"--max-length must be positive, got {explicit}")
    if limit is not None and explicit > limit:
        raise ExportError(f"--max-length {explicit} exceeds what the model's positions allow ({limit})")
    return explicit


def derive_max_length(
    config: dict[str, Any],
    *,
    explicit: int | None,
    st_root: Path | None,
    tokenizer_max: int | None,
) -> int:
    """--max-length, else sentence-transformers max_seq_length, else tokenizer limit capped by positions."""
    limit = position_limit(config)
    if explicit is not None:
        return check_max_length(explicit, limit)
    if st_root is not None and (st_root / "sentence_bert_config.json").is_file():
        msl = read_json(st_root / "sentence_bert_config.json").get("max_seq_length")
        if isinstance(msl, int) and msl > 0:
            return min(msl, limit) if limit else msl
    candidates = [x for x in (tokenizer_max, limit) if isinstance(x, int) and 0 < x < 1_000_000]
    if not candidates:
        return 512
    return min(candidates)


def tokenizer_model_max_length(folder: Path | None) -> int | None:
    if folder is None or not (folder / "tokenizer_config.json").is_file():
        return None
    value = read_json(folder / "tokenizer_config.json").get("model_max_length")
    if isinstance(value, (int, float)) and 0 < value < 1_000_000:
        return int(value)
    return None


def labels_of(config: dict[str, Any]) -> list[str] | None:
    id2label = config.get("id2label")
    if isinstance(id2label, dict) and id2label:
        return [str(id2label[k]) for k in sorted(id2label, key=lambda k: int(k))]
    n = config.get("num_labels")
    if isinstance(n, int) and n > 0:
        return [f"LABEL_{i}" for i in range(n)]
    return None


def detect(
    config: dict[str, Any],
    *,
    task: str = "auto",
    model_dir: Path | None = None,
    st_root: Path | None = None,
    max_length: int | None = None,
    tokenizer_max: int | None = None,
    name: str = "",
    template: dict[str, str] | None = None,
) -> SourceInfo:
    """Decide task and post-processing from a config dict and the (optional) folder around it.

    ``name`` (hub id or folder) and ``template`` let decoder LMs say they are rerankers or embedders.
    """
    if task not in TASKS:
        raise ExportError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    model_type = str(config.get("model_type") or "")
    if not model_type:
        raise UnsupportedModelError("config.json has no model_type: not a Hugging Face transformers model")
    archs = config.get("architectures") or []
    architecture = str(archs[0]) if archs else ""
    from encapure.export import qwen3  # JSON-only at import

    family = qwen3.family_task(config, task=task, name=name, template=template)
    if family is not None:
        return _decoder_info(config, family, model_dir=model_dir, st_root=st_root, max_length=max_length,
                             name=name, template=template, architecture=architecture, model_type=model_type)
    if architecture.endswith(_UNEXPORTABLE_SUFFIXES):
        raise UnsupportedModelError(
            f"architecture {architecture} cannot be exported: Encapure serves encoders "
            "(sequence classification for rerank/classify, base encoders for embeddings)"
        )
    is_seq_cls = architecture.endswith("ForSequenceClassification")
    labels = labels_of(config) if is_seq_cls else None
    n_labels = len(labels) if labels else 0

    if task == "auto":
        task = ("rerank" if n_labels == 1 else "classify") if is_seq_cls else "embed"
    elif task in ("rerank", "classify") and not is_seq_cls:
        raise UnsupportedModelError(
            f"--task {task} needs a *ForSequenceClassification model; {architecture or model_type} has no "
            "classification head"
        )
    elif task == "rerank" and n_labels != 1:
        raise UnsupportedModelError(f"--task rerank needs a model with one output label; this one has {n_labels}")

    pooling: str | None = None
    normalize = False
    if task == "embed":
        if st_root is not None:
            pooling, normalize = st_pooling_and_normalize(st_root)
        if pooling is None:
            pooling = "cls"
    activation = {"rerank": "sigmoid", "classify": "softmax", "embed": "none"}[task]
    if task == "classify" and n_labels == 1:
        activation = "sigmoid"
    ml = derive_max_length(config, explicit=max_length, st_root=st_root, tokenizer_max=tokenizer_max)
    return SourceInfo(
        task=task,
        model_dir=model_dir,
        config=config,
        architecture=architecture,
        model_type=model_type,
        labels=labels if task != "embed" else None,
        pooling=pooling,
        normalize=normalize,
        max_length=ml,
        score_activation=activation,
    )


def _decoder_info(config: dict[str, Any], task: str, *, model_dir: Path | None, st_root: Path | None,
                  max_length: int | None, name: str, template: dict[str, str] | None, architecture: str,
                  model_type: str) -> SourceInfo:
    """A decoder LM: last-token scoring or pooling, a long default context (see export/qwen3.py)."""
    from encapure.export import qwen3

    ml = qwen3.default_max_length(config, max_length, position_limit(config))
    if task == "rerank":
        tpl = dict(template) if template is not None else dict(qwen3.QWEN3_RERANK_TEMPLATE)
        return SourceInfo(task="rerank", model_dir=model_dir, config=config, architecture=architecture,
                          model_type=model_type, labels=None, pooling=None, normalize=False, max_length=ml,
                          score_activation="sigmoid", prompt_template=tpl, decoder=True)
    pooling, normalize = st_pooling_and_normalize(st_root) if st_root is not None else (None, False)
    if pooling is None:
        pooling, normalize = "last", True
    return SourceInfo(task="embed", model_dir=model_dir, config=config, architecture=architecture,
                      model_type=model_type, labels=None, pooling=pooling, normalize=normalize, max_length=ml,
                      score_activation="none", query_prefix=qwen3.query_prefix_for(config, name), decoder=True)

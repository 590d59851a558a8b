"""Where a model comes from: an exported folder, a plain ONNX folder, or a Hugging Face model.

The engine loads folders. A Hugging Face source (a hub id or a plain HF folder) is handed to an
``exporter`` that returns an exported folder; by default ``encapure.hub.cached_export``, which
exports once into ``Settings.cache_dir`` (``ENCAPURE_CACHE``) and reuses the result. The engine
itself never imports ``encapure.export`` (torch): the hub module does, and only when it builds.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from encapure.engine.backends import create_session
from encapure.engine.colbert import ColbertModel
from encapure.engine.model import OnnxModel
from encapure.errors import InvalidInputError, ModelError, ModelNotFoundError
from encapure.hub import Exporter, cached_export, is_hub_id
from encapure.manifest import MANIFEST_NAME, Manifest
from encapure.registry import lookup
from encapure.settings import Settings

log = logging.getLogger(__name__)

# Keyword arguments of load_model that go to OnnxModel rather than the manifest.
_MODEL_KWARGS = {"truncation_side", "window_overlap", "warmup"}
_MANIFEST_FIELDS = {f.name for f in dataclasses.fields(Manifest)}


def load_model(
    path_or_id: str | Path,
    *,
    settings: Settings | None = None,
    name: str | None = None,
    exporter: Exporter = cached_export,
    **overrides: Any,
) -> OnnxModel:
    """Load a model for inference.

    - an exported folder (has ``encapure.json``): the manifest decides; ``overrides`` may replace
      manifest fields (e.g. ``query_prefix``);
    - a plain folder (or ``.onnx`` file) with an ONNX model we did not export: give ``task`` and,
      for embedders, ``pooling``/``normalize``; ``tokenizer`` points to a ``tokenizer.json`` when
      the folder has none;
    - a Hugging Face folder or hub id: ``exporter`` turns it into an exported folder at
      ``precision`` (default ``settings.precision``); the default one caches it in ``settings.cache_dir``,
      in the format ``settings.backend`` runs fastest (``encapure.hub.export_format``: the static int8
      IR for embedders on OpenVINO, ONNX otherwise).
    """
    settings = settings or Settings()
    model_kwargs = {k: overrides.pop(k) for k in list(overrides) if k in _MODEL_KWARGS}
    source = str(path_or_id)
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".onnx":
        return _load_plain(path.parent, settings, name, model_file=path.name, overrides=overrides,
                           model_kwargs=model_kwargs)
    if path.is_dir():
        if (path / MANIFEST_NAME).is_file():
            return _load_exported(path, settings, name, overrides, model_kwargs)
        if overrides.get("model_file") or any(path.glob("*.onnx")):
            return _load_plain(path, settings, name, model_file=overrides.pop("model_file", None),
                               overrides=overrides, model_kwargs=model_kwargs)
        if (path / "config.json").is_file():
            folder = exporter(path, settings=settings, **_export_kwargs(overrides))
            return _load_exported(folder, settings, name or path.name, overrides, model_kwargs)
        raise ModelNotFoundError(
            f"{path} holds no model: expected encapure.json (exported), *.onnx (plain ONNX) "
            "or config.json (Hugging Face)"
        )
    if path.exists():
        raise ModelNotFoundError(f"{path} is not a model folder or .onnx file")
    info = lookup(source)
    hub_id = info.hub_id if info else source
    if not is_hub_id(hub_id):
        raise ModelNotFoundError(f"{source!r} is neither a local model folder nor a Hugging Face model id")
    folder = exporter(hub_id, settings=settings, **_export_kwargs(overrides))
    return _load_exported(folder, settings, name or hub_id, overrides, model_kwargs)


def _export_kwargs(overrides: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in ("precision", "task", "max_length"):
        if k in overrides:
            out[k] = overrides.pop(k)
    return out


def _apply_registry(manifest: Manifest) -> None:
    """Fill what the export could not know (prefixes) from the registry, never overriding it."""
    info = lookup(manifest.source) if manifest.source else None
    if info is None or info.task != manifest.task:
        return
    if manifest.query_prefix is None and info.query_prefix:
        manifest.query_prefix = info.query_prefix
    if manifest.document_prefix is None and info.document_prefix:
        manifest.document_prefix = info.document_prefix


def _apply_overrides(manifest: Manifest, overrides: dict[str, Any]) -> Manifest:
    bad = [k for k in overrides if k not in _MANIFEST_FIELDS]
    if bad:
        raise InvalidInputError(f"unknown model option(s): {', '.join(sorted(bad))}")
    if overrides:
        manifest = dataclasses.replace(manifest, **overrides)
        manifest.validate()
    return manifest


def _load_exported(folder: Path, settings: Settings, name: str | None, overrides: dict[str, Any],
                   model_kwargs: dict[str, Any]) -> OnnxModel:
    manifest = Manifest.load(folder)
    _apply_registry(manifest)
    manifest = _apply_overrides(manifest, dict(overrides))
    cls = ColbertModel if manifest.output_kind == "multi_vector" else OnnxModel
    return cls(folder, manifest, settings=settings, name=name, **model_kwargs)


def _load_plain(
    folder: Path,
    settings: Settings,
    name: str | None,
    *,
    model_file: str | None,
    overrides: dict[str, Any],
    model_kwargs: dict[str, Any],
) -> OnnxModel:
    """A third-party ONNX file: what the manifest would say comes from arguments and the graph."""
    opts = dict(overrides)
    if model_file is None:
        model_file = "model.onnx" if (folder / "model.onnx").is_file() else None
        if model_file is None:
            candidates = sorted(p.name for p in folder.glob("*.onnx"))
            if len(candidates) != 1:
                raise ModelNotFoundError(
                    f"{folder} has {len(candidates)} .onnx files ({', '.join(candidates)}); pass model_file="
                )
            model_file = candidates[0]
    task = opts.pop("task", None)
    if task not in ("rerank", "embed", "classify"):
        raise InvalidInputError(
            f"{folder} has no encapure.json, so the task must be given: task='rerank', 'embed' or 'classify'"
        )
    tok = opts.pop("tokenizer", None)
    tok_path = Path(tok) if tok else folder / "tokenizer.json"
    if tok_path.is_dir():
        tok_path = tok_path / "tokenizer.json"
    if not tok_path.is_file():
        raise ModelNotFoundError(
            f"no tokenizer.json in {folder}; pass tokenizer='path/to/tokenizer.json' (or its folder)"
        )
    session = create_session(folder / model_file, settings)
    inputs = [i.name for i in session.get_inputs()]
    outputs = {o.name: o for o in session.get_outputs()}
    unknown = [n for n in inputs if n not in ("input_ids", "attention_mask", "token_type_ids")]
    if unknown or "input_ids" not in inputs:
        raise ModelError(
            f"{model_file} takes inputs {inputs}; Encapure feeds input_ids, attention_mask and "
            "token_type_ids only (input_ids required)"
        )
    output_name = opts.pop("output_name", None)
    if output_name is None:
        preferred = {"rerank": ("logits",), "classify": ("logits",),
                     "embed": ("sentence_embedding", "last_hidden_state", "token_embeddings")}[task]
        output_name = next((n for n in preferred if n in outputs), None)
        if output_name is None:
            if len(outputs) != 1:
                raise ModelError(f"{model_file} has outputs {list(outputs)}; pass output_name= to pick one")
            output_name = next(iter(outputs))
    elif output_name not in outputs:
        raise ModelError(f"{model_file} has no output {output_name!r}; it has {list(outputs)}")
    rank = len(outputs[output_name].shape or [])
    pooling = opts.pop("pooling", None)
    if task == "embed":
        if rank == 3:
            kind = "token_embeddings"
            if pooling is None:
                raise InvalidInputError(
                    f"output {output_name!r} holds token vectors; pass pooling='mean', 'cls', 'max' or 'last'"
                )
        elif rank == 2:
            kind = "sentence_embedding"
        else:
            raise ModelError(f"output {output_name!r} has rank {rank}; an embedder needs [B, D] or [B, L, D]")
    else:
        if rank not in (1, 2):
            raise ModelError(
                f"output {output_name!r} has rank {rank}; a {task} model needs logits [B, labels]"
            )
        kind = "logits"
    max_length = opts.pop("max_length", None) or _tokenizer_max_length(tok_path) or 512
    last = outputs[output_name].shape[-1] if rank >= 2 else None
    manifest = Manifest(
        task=task,
        precision=opts.pop("precision", "unknown"),
        max_length=int(max_length),
        input_names=inputs,
        output_name=output_name,
        output_kind=kind,  # type: ignore[arg-type]
        model_file=model_file,
        tokenizer_file=str(tok_path),
        pooling=pooling,
        normalize=bool(opts.pop("normalize", False)),
        score_activation=opts.pop("score_activation", "sigmoid" if task == "rerank" else (
            "softmax" if task == "classify" else "none")),
        embedding_dim=last if isinstance(last, int) and task == "embed" else None,
        source=str(folder),
    )
    manifest = _apply_overrides(manifest, opts)
    return OnnxModel(folder, manifest, settings=settings, name=name or folder.name,
                     tokenizer_path=tok_path, session=session, **model_kwargs)


def _tokenizer_max_length(path: Path) -> int | None:
    try:
        trunc = json.loads(path.read_text(encoding="utf-8")).get("truncation") or {}
    except (OSError, json.JSONDecodeError):
        return None
    value = trunc.get("max_length")
    return int(value) if value else None

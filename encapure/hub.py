"""Hugging Face sources and the export cache: the one place that turns a hub id into a model folder.

Why a module of its own: the engine only loads folders; exporting needs torch and lives in
``encapure.export``. This module sits between them. ``cached_export`` is the exporter the engine
is handed for Hugging Face sources (``encapure.engine.loading.load_model(exporter=...)``), and it
imports ``encapure.export`` only when it has to build, so the engine never imports the exporter.

``cached_build`` is the one cache mechanism (the library's ``ENCAPURE_CACHE``, the test fixtures
and the benchmark scripts may use different folders, but the same keyed build): concurrent
processes are serialized by a file lock per entry and the entry is built in a private temporary
folder that is renamed into place only when complete, so a crash or a racing process never
leaves a half-written model where a reader would find it.

Which format an export on load takes depends on the backend that will run it (``export_format``):
ONNX Runtime runs only ONNX, so ``backend=onnxruntime`` always gets ONNX; the OpenVINO backend asks
for format ``auto`` at int8, which makes embedders the NNCF static int8 IR (the fastest int8
embedder there) and leaves everything else ONNX. ``backend=auto`` at int8, for an embedder, with
openvino and nncf installed, makes both and keeps what a probe measures faster (``choose_format``).
The format request is part of the cache key, so an entry made for one backend is never handed to
another that cannot run it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Protocol

from filelock import FileLock

from encapure.errors import ExportError, ModelError, UnsupportedModelError
from encapure.manifest import MANIFEST_NAME, Manifest
from encapure.settings import Settings

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What an export reads from a hub repository: config, tokenizer files, weights, pooling config.
# artifact.metadata: a colbert-ai checkpoint's markers and lengths (ColBERT exports read it).
_HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "1_Pooling/*", "*.bin", "artifact.metadata"]


def is_hub_id(text: str) -> bool:
    """``org/name``: the shape of a Hugging Face model id (not a check that it exists)."""
    return bool(_HUB_ID.match(text))


def download(repo_id: str) -> Path:
    """Fetch the files an export needs from the hub (or its local cache); errors say what to do."""
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo_id, allow_patterns=_HUB_FILES)
    except Exception as e:
        name = type(e).__name__
        if "Offline" in name or "Connection" in name or "LocalEntryNotFound" in name:
            raise ExportError(
                f"cannot download {repo_id}: the Hugging Face hub is unreachable (offline?); "
                "pass a local model folder instead"
            ) from e
        if "RepositoryNotFound" in name or "HFValidation" in name:
            raise UnsupportedModelError(f"{repo_id} is neither a local folder nor a hub model id") from e
        raise ExportError(f"cannot download {repo_id}: {str(e).strip().splitlines()[0]}") from e
    return Path(folder)


# --- the export cache ---------------------------------------------------------------------------
# What the int8 IR recipes import at export time (nncf compresses; serving needs only openvino).
IR_MODULES = ("openvino", "nncf")


def missing_ir_modules() -> list[str]:
    """The modules an int8 IR export needs that this install lacks (none in ``encapure[export,openvino]``)."""
    return [m for m in IR_MODULES if importlib.util.find_spec(m) is None]


def export_format(backend: str, precision: str, task: str = "auto") -> str:
    """The format to ask the exporter for when ``backend`` will run the export at ``precision``.

    ``auto`` (resolved after task detection: the static int8 IR for embedders, ONNX otherwise) only
    for ``backend="openvino"`` at int8, and only where openvino and nncf are installed; otherwise
    ``onnx``, so a partial install falls back to the ONNX entry (and a later full install gets the
    IR under its own key instead of finding that fallback cached). ``backend="auto"`` gets ONNX here,
    the format every backend runs; ``choose_format`` adds the IR beside it where it may pay. A
    ``task`` known to be no embedding keeps ONNX too, sharing the entry other backends use.
    """
    if backend != "openvino" or precision != "int8" or task in ("rerank", "classify"):
        return "onnx"
    missing = missing_ir_modules()
    if missing:
        _warn_no_ir(tuple(missing))
        return "onnx"
    return "auto"


@cache
def _warn_no_ir(missing: tuple[str, ...]) -> None:
    """Once per process: the format is asked for on every cache look-up, the advice is needed once."""
    log.warning("backend openvino: the int8 embedder recipe (static int8 IR) needs %s; int8 embedders "
                "exported on load stay ONNX (slower): pip install 'encapure[export,openvino]'", " and ".join(missing))


def across_formats(backend: str, precision: str, task: str = "auto") -> bool:
    """Whether an export on load should compare the ONNX export with the OpenVINO int8 IR
    (``choose_format``): ``backend=auto`` at int8 for what may be an embedder, where both runtimes and
    nncf are installed. Without them auto is ONNX Runtime on ONNX, as before, and says nothing."""
    return backend == "auto" and precision == "int8" and task not in ("rerank", "classify") and not missing_ir_modules()


def _ir_candidate(manifest: Manifest) -> bool:
    """An encoder embedder: what the IR recipe was measured on (``resolve_format`` makes the IR only for
    those; a decoder embedder, pooled on its last token, would get a second ONNX export for nothing)."""
    return manifest.task == "embed" and manifest.output_kind == "token_embeddings" and manifest.pooling != "last"


def choose_format(build: Callable[[str], Path], settings: Settings) -> Path:
    """``build("onnx")``, or ``build("auto")`` (the IR) if the probe across formats picks it.

    The ONNX export comes first: it is the reference, and it says (manifest) whether the model is an
    embedder the IR is made for. A failing IR export costs the choice, not the model.
    """
    onnx = build("onnx")
    if not _ir_candidate(Manifest.load(onnx)):
        return onnx
    try:
        ir = build("auto")
    except Exception as e:  # the ONNX export serves; say why the faster candidate is missing
        log.warning("backend auto: no OpenVINO IR candidate for %s (%s: %s); ONNX it is", onnx, type(e).__name__, e)
        return onnx
    if not Manifest.load(ir).model_file.endswith(".xml"):
        return onnx
    from encapure.engine.backends import open_backend
    from encapure.engine.backends.auto import choose_export

    return choose_export(onnx, ir, settings, open_backend)


def cache_key(source: str | Path, precision: str, task: str = "auto", max_length: int | None = None,
              format: str = "onnx") -> str:
    """A readable, collision-safe folder name for one (source, export options, exporter version).

    ``format`` enters the key only when it is not ``onnx``, so ONNX entries made before it existed
    keep their names; with it the IR recipe's own version for ``precision`` past 1 (an IR recipe can
    change while the ONNX exports and the other precisions' IRs stay as they were).
    """
    src = str(source)
    p = Path(src).expanduser()
    ident = str(p.resolve()) if p.exists() else src
    version: object = 0
    with contextlib.suppress(ImportError):  # serving install without the export extra
        from encapure.export import EXPORT_VERSION as version
    parts: list[object] = [ident, precision, task, max_length, str(version)]
    label = precision
    if format != "onnx":
        tag = ""
        with contextlib.suppress(ImportError):
            from encapure.export.openvino_ir import ir_recipe_tag

            tag = ir_recipe_tag(precision)
        parts.append(f"{format}/{tag}" if tag else format)
        label = f"{precision}-{format}"
    h = hashlib.sha256(json.dumps(parts).encode()).hexdigest()
    slug = re.sub(r"[^A-Za-z0-9._-]+", "--", ident.strip("/"))[-80:]
    return f"{slug}--{label}--{h[:12]}"


def cached_build(cache_dir: Path, key: str, build: Callable[[Path], object]) -> Path:
    """Return ``cache_dir/key``, building it with ``build(tmp_folder)`` once across processes.

    An entry is complete when it holds a manifest (``encapure.json``); anything else under the
    key is a leftover and is rebuilt.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    final = cache_dir / key
    if (final / MANIFEST_NAME).is_file():
        return final
    locks = cache_dir / ".locks"
    locks.mkdir(exist_ok=True)
    with FileLock(str(locks / f"{key}.lock")):
        if (final / MANIFEST_NAME).is_file():  # another process finished while we waited
            return final
        if final.exists():  # a leftover without a manifest is not a model: rebuild it
            shutil.rmtree(final, ignore_errors=True)
        tmp = cache_dir / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            build(tmp)
            if not (tmp / MANIFEST_NAME).is_file():
                raise ModelError(f"building {key} produced no {MANIFEST_NAME}")
            os.replace(tmp, final)  # atomic on one filesystem: readers see nothing or everything
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final


class Exporter(Protocol):
    """Turns a Hugging Face folder or hub id into an exported model folder (what ``load_model`` is handed)."""

    def __call__(
        self,
        source: str | Path,
        *,
        settings: Settings | None = ...,
        precision: str | None = ...,
        task: str = ...,
        max_length: int | None = ...,
    ) -> Path: ...


def cached_export(
    source: str | Path,
    *,
    settings: Settings | None = None,
    precision: str | None = None,
    task: str = "auto",
    max_length: int | None = None,
    format: str | None = None,
) -> Path:
    """Export a Hugging Face folder or hub id into ``settings.cache_dir`` once; return the folder.

    ``format`` (default: ``export_format(settings.backend, precision, task)``) is what the exporter is
    asked for: ``onnx``, ``openvino`` or ``auto``; with no ``format`` and ``backend=auto`` at int8,
    ``choose_format`` may export both and return the faster.
    """
    settings = settings or Settings()
    precision = precision or settings.precision
    if format is None and across_formats(settings.backend, precision, task):
        return choose_format(lambda fmt: cached_export(source, settings=settings, precision=precision, task=task,
                                                       max_length=max_length, format=fmt), settings)
    format = format or export_format(settings.backend, precision, task)
    key = cache_key(source, precision, task, max_length, format)

    def build(tmp: Path) -> None:
        try:
            from encapure.export import export_model
        except ImportError as e:
            raise ModelError(
                "exporting a Hugging Face model needs the export extra: pip install 'encapure[export]'"
            ) from e
        log.info("exporting %s (%s, format %s) into the cache at %s", source, precision, format, settings.cache_dir)
        export_model(str(source), tmp, task=task, precision=precision, max_length=max_length, format=format)

    return cached_build(Path(settings.cache_dir).expanduser(), key, build)


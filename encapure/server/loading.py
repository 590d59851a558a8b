"""Which models to serve and how to load them (the engine does the loading itself).

``--model`` values are ``ID_OR_PATH``, ``name=ID_OR_PATH`` or ``name,alias,...=ID_OR_PATH`` (aliases
are further names requests may use, e.g. the hard-coded ``rerank-english-v3.0`` of a Cohere
client). The default model is the hub's
bge-reranker-v2-m3; on a machine that cannot reach the hub (and has not cached it) we fall back to
the small local reranker fixture so that ``make serve`` still starts a working server, and say so.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from encapure.engine.types import InferenceModel
from encapure.errors import ExportError, InvalidInputError
from encapure.hub import (
    across_formats,
    cache_key,
    cached_export,
    choose_format,
    download,
    export_format,
    is_hub_id,
)
from encapure.manifest import MANIFEST_NAME
from encapure.registry import lookup
from encapure.settings import DEFAULT_RERANKER, LARGE_MODEL_PARAMETERS, Settings

log = logging.getLogger("encapure.server")

FALLBACK_FIXTURE = "minilm-l6-wikiqa-reranker"


@dataclass
class ModelSpec:
    name: str
    source: str
    is_default: bool = False
    aliases: tuple[str, ...] = ()


def parse_specs(settings: Settings) -> list[ModelSpec]:
    values = [v.strip() for v in settings.model if v and v.strip()]
    if not values:
        values = [DEFAULT_RERANKER]
    explicit = "model" in settings.model_fields_set
    specs: list[ModelSpec] = []
    seen: set[str] = set()
    for v in values:
        name, sep, source = v.partition("=")
        # A Windows drive or an id containing '=' is not a name; names are simple words.
        if not sep or not name or "/" in name or os.sep in name:
            name, source = "", v
        source = source.strip()
        names = [n.strip() for n in name.split(",")] if name else []
        if any(not n for n in names):
            raise InvalidInputError(f"--model {v!r}: an empty name; write NAME[,ALIAS...]=ID_OR_PATH")
        if not names:
            path = Path(source).expanduser()
            names = [path.resolve().name if path.exists() else source]
        for n in names:
            if n in seen:
                raise InvalidInputError(f"two models are named {n!r}; name them with --model NAME=ID_OR_PATH")
            seen.add(n)
        specs.append(
            ModelSpec(
                name=names[0],
                source=source,
                is_default=source == DEFAULT_RERANKER and not explicit,
                aliases=tuple(names[1:]),
            )
        )
    return specs


def find_fixture() -> Path | None:
    """The local reranker fixture: $ENCAPURE_SHARED, then ../shared beside the repo or the cwd."""
    roots = []
    if os.environ.get("ENCAPURE_SHARED"):
        roots.append(Path(os.environ["ENCAPURE_SHARED"]))
    roots.append(Path(__file__).resolve().parents[2].parent / "shared")
    roots.append(Path.cwd().parent / "shared")
    roots.append(Path.cwd() / "shared")
    for root in roots:
        cand = root / "models" / FALLBACK_FIXTURE
        if (cand / "config.json").exists():
            return cand
    return None


# --- exporting, out of the serving process -----------------------------------------------------
EXPORT_MODULES = ("torch", "transformers", "onnx")


def missing_export_modules() -> list[str]:
    return [m for m in EXPORT_MODULES if importlib.util.find_spec(m) is None]


def _export_source(source: str) -> str | None:
    """What the exporter would be handed for ``source`` (a Hugging Face folder or hub id), or None
    when the engine loads it as it is (an exported folder, a folder with ONNX files, an .onnx file)."""
    path = Path(source).expanduser()
    if path.is_file() or (path.is_dir() and ((path / MANIFEST_NAME).is_file() or any(path.glob("*.onnx")))):
        return None
    if path.is_dir():
        return str(path)
    info = lookup(source)
    return info.hub_id if info else source


def _cache_entry(source: str, settings: Settings) -> Path:
    """Where the export on load of ``source`` lives (or will), in the format the backend asks for."""
    key = cache_key(source, settings.precision, format=export_format(settings.backend, settings.precision))
    return Path(settings.cache_dir).expanduser() / key


def _cached(source: str, settings: Settings) -> bool:
    return (_cache_entry(source, settings) / MANIFEST_NAME).is_file()


def preflight(settings: Settings) -> str | None:
    """Before the server listens: a one-line, actionable reason it could not load its models, or
    None. Today: a model that must be exported (a Hugging Face folder or hub id, not yet in the
    export cache) on an install without the export extra (torch, transformers, onnx)."""
    missing = missing_export_modules()
    if not missing:
        return None
    for spec in parse_specs(settings):
        src = _export_source(spec.source)
        if src is None or _cached(src, settings):
            continue
        if spec.is_default and (fixture := find_fixture()) is not None and _cached(str(fixture), settings):
            continue
        return (
            f"encapure serve: model {spec.source!r} is a Hugging Face model that must first be exported to "
            f"ONNX, which needs {', '.join(missing)} (not in the serving install): pip install "
            f"'encapure[export]', or run `encapure export {spec.source} -o DIR` where it is installed and "
            "serve --model DIR"
        )
    return None


def export_in_child(
    source: str | Path,
    *,
    settings: Settings | None = None,
    precision: str | None = None,
    task: str = "auto",
    max_length: int | None = None,
) -> Path:
    """The server's exporter: ``encapure.hub.cached_export`` run in a child process, so torch and
    transformers are never imported by the serving process (a first ``make serve`` held them:
    823 MB RSS at ready for a 24 MB model, 164 MB after a restart). Same cache, same lock. Under
    ``--backend auto`` at int8 the child may export twice (ONNX, then the IR) and this process, which
    runs the model, probes which one it serves (``encapure.hub.choose_format``)."""
    settings = settings or Settings()
    precision = precision or settings.precision
    if across_formats(settings.backend, precision, task):
        return choose_format(lambda fmt: _export_in_child(source, settings, precision, task, max_length, fmt),
                             settings)
    return _export_in_child(source, settings, precision, task, max_length,
                            export_format(settings.backend, precision, task))  # the IR for int8 embedders on OpenVINO


def _export_in_child(source: str | Path, settings: Settings, precision: str, task: str, max_length: int | None,
                     fmt: str) -> Path:
    cache_dir = Path(settings.cache_dir).expanduser()
    final = cache_dir / cache_key(source, precision, task, max_length, fmt)
    if (final / MANIFEST_NAME).is_file():
        return final
    missing = missing_export_modules()
    if missing:
        raise ExportError(
            f"exporting {source} needs {', '.join(missing)}: pip install 'encapure[export]', or serve a folder "
            "made by `encapure export`"
        )
    if is_hub_id(str(source)) and not Path(source).expanduser().exists():
        # fetched here, before any "exporting" line: offline, the log says the hub is unreachable
        # and not that an export started (the child then finds the files in the hub's cache)
        log.info("fetching %s from the Hugging Face hub", source)
        download(str(source))
    log.info("exporting %s (%s, format %s) in a child process into the cache at %s", source, precision, fmt, cache_dir)
    job = {"source": str(source), "cache_dir": str(cache_dir), "precision": precision, "task": task,
           "max_length": max_length, "format": fmt}
    proc = subprocess.run(
        [sys.executable, "-m", "encapure.server.loading", json.dumps(job)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        raise ExportError(f"exporting {source} failed: {lines[-1] if lines else f'exit status {proc.returncode}'}")
    return Path(proc.stdout.strip().splitlines()[-1])


def _export_child(job: dict[str, object]) -> int:
    """The child's side of ``export_in_child``: export, print the folder; one line on failure."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        settings = Settings(cache_dir=Path(str(job["cache_dir"])))
        max_length = job.get("max_length")
        folder = cached_export(
            str(job["source"]),
            settings=settings,
            precision=str(job["precision"]),
            task=str(job["task"]),
            max_length=int(str(max_length)) if max_length is not None else None,
            format=str(job.get("format", "onnx")),
        )
    except Exception as e:
        print(f"{type(e).__name__}: {e}".splitlines()[0], file=sys.stderr)
        return 1
    print(folder)
    return 0


# --- sizing the worker pool by the models ---------------------------------------------------
# Bytes a parameter takes in a weight file of each precision (int4 IR: ~0.52 measured, bge-m3).
_BYTES_PER_PARAMETER = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5}
_WEIGHT_SUFFIXES = (".onnx", ".data", ".onnx_data", ".bin", ".safetensors")


def _weight_bytes(files: list[Path]) -> int:
    return sum(f.stat().st_size for f in files if f.is_file() and f.name.endswith(_WEIGHT_SUFFIXES))


def _exported_parameters(folder: Path) -> int | None:
    """Parameters of an exported folder: its model files' bytes over the bytes a parameter takes."""
    from encapure.manifest import Manifest

    try:
        manifest = Manifest.load(folder)
    except Exception:  # an unreadable manifest is the loader's to report
        return None
    stem = Path(manifest.model_file).stem
    size = _weight_bytes([f for f in folder.iterdir() if f.name.split(".")[0] == stem])
    return int(size / _BYTES_PER_PARAMETER.get(manifest.precision, 4.0)) or None


def estimate_parameters(source: str, settings: Settings) -> int | None:
    """About how many parameters the model ``source`` has, from files already on disk (the folder or
    file served, its cached export, or a Hugging Face folder's weights); None when nothing is there
    yet (a hub id not yet exported). Only a size class is needed (``Settings.workers_for``): plain
    ONNX files count as fp32, so a third-party int8 file reads as a quarter of its size."""
    path = Path(source).expanduser()
    try:
        if path.is_file():
            return _weight_bytes([path, *path.parent.glob(path.name + ".*")]) // 4 or None
        if path.is_dir() and (path / MANIFEST_NAME).is_file():
            return _exported_parameters(path)
        if path.is_dir() and any(path.glob("*.onnx")):
            return _weight_bytes([*path.glob("*.onnx"), *path.glob("*.onnx.data"), *path.glob("*.onnx_data")]) // 4 or None
        src = _export_source(source)
        if src is None:
            return None
        cached = _cache_entry(src, settings)
        if (cached / MANIFEST_NAME).is_file():
            return _exported_parameters(cached)
        if path.is_dir():  # a Hugging Face folder still to export: its weights, in their dtype
            dtype = json.loads((path / "config.json").read_text()).get("torch_dtype") or "float32"
            per = 2.0 if dtype in ("float16", "bfloat16") else 4.0
            return int(_weight_bytes([*path.glob("*.safetensors"), *path.glob("pytorch_model*.bin")]) / per) or None
    except (OSError, ValueError):
        return None
    return None


def sized_settings(settings: Settings, specs: list[ModelSpec]) -> Settings:
    """``settings`` with the worker count the served models call for (``Settings.workers_for``): one
    pool serves every model, so the largest model decides. Unchanged when ``workers`` was set."""
    if "workers" in settings.model_fields_set:
        return settings
    workers = min((settings.workers_for(estimate_parameters(s.source, settings)) for s in specs),
                  default=settings.workers)
    if workers == settings.workers:
        return settings
    log.info("%d inference worker(s) for a model of over %d M parameters (--workers to choose)",
             workers, LARGE_MODEL_PARAMETERS // 1_000_000)
    return settings.model_copy(update={"workers": workers})


def load_spec(spec: ModelSpec, settings: Settings) -> tuple[ModelSpec, InferenceModel, float]:
    """Load (export first if needed) one model; blocking, run it in a thread. Returns load seconds."""
    from encapure.engine import load_model

    t0 = time.perf_counter()
    log.info("loading model", extra={"model": spec.name, "source": spec.source})
    try:
        # No engine warm-up: the server warms each model itself once the scheduler runs (a request
        # through the whole pipeline, then the largest batch where it is cheap), which covers its
        # shapes; for a large model the engine's two extra shapes were start-up time for nothing.
        model = load_model(spec.source, settings=settings, name=spec.name, exporter=export_in_child, warmup=False)
    except Exception as e:
        fixture = find_fixture() if spec.is_default else None
        if fixture is None:
            raise
        log.warning(
            "default model %s is unavailable (%s: %s); the hub is probably unreachable. "
            "FALLING BACK to the local reranker fixture %s",
            spec.source,
            type(e).__name__,
            e,
            fixture,
        )
        spec = ModelSpec(name=FALLBACK_FIXTURE, source=str(fixture))
        model = load_model(str(fixture), settings=settings, name=spec.name, exporter=export_in_child, warmup=False)
    return spec, model, time.perf_counter() - t0


if __name__ == "__main__":
    sys.exit(_export_child(json.loads(sys.argv[1])))

"""Which models to serve and how to load them (the engine does the loading itself).

``--model`` values are ``ID_OR_PATH``, ``name=ID_OR_PATH`` or ``name,alias,...=ID_OR_PATH`` (aliases
are further names requests may use, e.g. the hard-coded ``rerank-english-v3.0`` of a Cohere
client). The default model is the hub's
bge-reranker-v2-m3; on a machine that cannot reach the hub (and has not cached it) we fall back to
the small local reranker fixture so that ``make serve`` still starts a working server, and say so.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from encapure.engine.types import InferenceModel
from encapure.errors import InvalidInputError
from encapure.settings import DEFAULT_RERANKER, Settings

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


def load_spec(spec: ModelSpec, settings: Settings) -> tuple[ModelSpec, InferenceModel, float]:
    """Load (export first if needed) one model; blocking, run it in a thread. Returns load seconds."""
    from encapure.engine import load_model

    t0 = time.perf_counter()
    log.info("loading model", extra={"model": spec.name, "source": spec.source})
    try:
        model = load_model(spec.source, settings=settings, name=spec.name)
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
        model = load_model(str(fixture), settings=settings, name=spec.name)
    return spec, model, time.perf_counter() - t0

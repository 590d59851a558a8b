"""``--backend auto``: pick, per model and machine, the fastest backend that scores like the reference.

Why a probe and not a rule: which runtime wins depends on the CPU (AVX2 vs AVX-512 VNNI kernels), the
precision and the model, and we measured both orders. A backend qualifies only if, on the probe
batch, (1) each row scored alone equals the same row scored in the padded batch within ``_INVARIANT``
(same input, same score, whatever its batch-mates), and (2) its outputs agree with ONNX Runtime's
within ``_AGREE`` (relative to the output scale), so switching runtime never changes what a user gets
by more than numeric noise. Among qualifying backends the fastest median wins; ONNX Runtime is the
reference and the fallback.

The decision is stored as JSON under ``<cache>/backend-probes/`` keyed by the model file (path, size,
mtime), the CPU, the runtimes' versions and the thread settings, so the probe runs once per machine
and model, and a restart picks the same backend (scores do not flip between restarts).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from encapure.settings import Settings

log = logging.getLogger(__name__)

_INVARIANT = 1e-5  # alone vs in a batch, absolute, on the raw outputs
_AGREE = 1e-3  # vs ONNX Runtime, relative to the largest |output| of the batch
_ROWS, _MAX_LEN, _REPS = 8, 64, 5


@dataclass
class ProbeResult:
    """What the probe saw: per backend its median seconds, invariance, agreement, or why it failed."""

    chosen: str
    seconds: dict[str, float] = field(default_factory=dict)
    invariance: dict[str, float] = field(default_factory=dict)
    agreement: dict[str, float] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    cpu: str = ""


def cpu_signature() -> str:
    """Model name and the ISA flags that change int8/fp32 kernels: a probe is only valid on its CPU."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name") and ":" in line:
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and ":" in line:
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8") if f in flags]
    return f"{name} [{' '.join(isa)}] x{os.cpu_count()}"


def _versions(names: list[str]) -> dict[str, str]:
    out = {}
    for n in names:
        try:
            out[n] = str(importlib.import_module(n).__version__)
        except Exception:
            out[n] = "absent"
    return out


def _key(path: Path, settings: Settings, candidates: list[str]) -> str:
    st = path.stat()
    parts = [str(path.resolve()), st.st_size, int(st.st_mtime), cpu_signature(), settings.workers,
             settings.resolved_threads(), settings.openvino_device, _versions(candidates)]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:20]


def _probe_feed(session: Any, vocab_hint: int = 1000) -> dict[str, np.ndarray]:
    """A padded batch of ``_ROWS`` rows of different lengths, with token ids every vocabulary has."""
    rng = np.random.default_rng(0)
    lengths = np.linspace(_MAX_LEN, 6, _ROWS).astype(int)
    ids = np.zeros((_ROWS, _MAX_LEN), np.int64)
    mask = np.zeros_like(ids)
    for r, n in enumerate(lengths):
        ids[r, :n] = rng.integers(5, vocab_hint, n)
        mask[r, :n] = 1
    feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    names = [i.name for i in session.get_inputs()]
    return {k: v for k, v in feed.items() if k in names}


def _rows(out: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
    """Per row what the engine reads: token rows up to the row's length, or the row's logits."""
    if out.ndim == 3:
        return [out[r, : int(mask[r].sum())] for r in range(out.shape[0])]
    return [out[r] for r in range(out.shape[0])]


def _measure(session: Any, feed: dict[str, np.ndarray]) -> tuple[list[np.ndarray], float, float]:
    """(rows of the batch, invariance max |alone - batched|, median seconds of the batch)."""
    mask = feed["attention_mask"]
    batched = _rows(np.asarray(session.run(None, feed)[0]), mask)
    worst = 0.0
    for r in range(mask.shape[0]):
        n = int(mask[r].sum())
        alone = {k: v[r : r + 1, :n] for k, v in feed.items()}
        row = _rows(np.asarray(session.run(None, alone)[0]), alone["attention_mask"])[0]
        worst = max(worst, float(np.abs(row - batched[r]).max()))
    times = []
    for _ in range(_REPS):
        t = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t)
    return batched, worst, statistics.median(times)


def probe(path: Path, settings: Settings, open_session: Callable[[str, Path, Settings], Any],
          candidates: list[str]) -> ProbeResult:
    """Run every candidate on the same batch; ``candidates[0]`` is the reference."""
    result = ProbeResult(chosen=candidates[0], cpu=cpu_signature())
    reference: list[np.ndarray] | None = None
    for name in candidates:
        try:
            session = open_session(name, path, settings)
            feed = _probe_feed(session)
            rows, worst, seconds = _measure(session, feed)
            del session
        except Exception as e:  # an optional runtime that is absent or cannot run this graph
            result.rejected[name] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}"
            continue
        result.invariance[name] = worst
        if reference is None:
            reference = rows
            agree = 0.0
        else:
            scale = max(float(np.abs(np.concatenate([r.ravel() for r in reference])).max()), 1e-6)
            agree = max(float(np.abs(a - b).max()) for a, b in zip(rows, reference, strict=True)) / scale
        result.agreement[name] = agree
        if worst > _INVARIANT:
            result.rejected[name] = f"not batch-invariant: {worst:.2g} alone vs batched"
        elif agree > _AGREE:
            result.rejected[name] = f"disagrees with {candidates[0]}: {agree:.2g} relative"
        else:
            result.seconds[name] = seconds
    if result.seconds:
        result.chosen = min(result.seconds, key=lambda n: result.seconds[n])
    return result


def choose(path: Path, settings: Settings, open_session: Callable[[str, Path, Settings], Any],
           candidates: list[str]) -> str:
    """The recorded choice for this model and machine, probing first when there is none."""
    folder = Path(settings.cache_dir).expanduser() / "backend-probes"
    record = folder / f"{_key(path, settings, candidates)}.json"
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
        if data.get("chosen") in candidates:
            return str(data["chosen"])
    except (OSError, ValueError):
        pass
    result = probe(path, settings, open_session, candidates)
    log.info("backend auto: %s for %s (median s %s; rejected %s; %s)", result.chosen, path,
             {k: round(v, 4) for k, v in result.seconds.items()}, result.rejected or "none", result.cpu)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = record.with_suffix(".tmp")
        tmp.write_text(json.dumps({"model": str(path), **asdict(result)}, indent=1), encoding="utf-8")
        tmp.replace(record)
    except OSError as e:  # a read-only cache only costs a probe per start
        log.warning("backend auto: cannot record the probe in %s (%s)", folder, e)
    return result.chosen

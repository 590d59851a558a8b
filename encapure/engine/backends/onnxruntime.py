"""The ONNX Runtime backend: every session option lives here and comes from ``Settings``.

Providers are resolved against what the installed onnxruntime build offers: asking for CUDA on a
CPU-only wheel falls back to CPU with a warning instead of failing at load time, because a model
server that refuses to start is worse than one that runs slower and says so.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import onnxruntime as ort

from encapure.errors import ModelError
from encapure.settings import Settings

log = logging.getLogger(__name__)

# Short names users may write in ENCAPURE_PROVIDERS.
_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "dml": "DmlExecutionProvider",
}

_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def resolve_providers(requested: list[str]) -> list[str]:
    """Keep the requested providers this onnxruntime build has, in order; CPU always last."""
    available = set(ort.get_available_providers())
    out: list[str] = []
    for name in requested:
        full = _ALIASES.get(name.lower(), name)
        if full in available:
            if full not in out:
                out.append(full)
        else:
            log.warning(
                "execution provider %s is not available in this onnxruntime build (%s); falling back",
                full,
                ", ".join(sorted(available)),
            )
    if "CPUExecutionProvider" not in out:
        out.append("CPUExecutionProvider")
    return out


def session_options(settings: Settings, *, intra_threads: int | None = None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = intra_threads if intra_threads is not None else settings.resolved_threads()
    so.inter_op_num_threads = 1  # transformer graphs are one chain; parallel branches gain nothing
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = _OPT_LEVELS[settings.graph_optimization]
    so.enable_cpu_mem_arena = settings.memory_arena
    so.enable_mem_pattern = settings.memory_arena
    so.log_severity_level = 3
    # Several workers share the session; with one intra-op thread per worker, spinning threads only
    # steal cycles from the other workers on a small machine.
    if so.intra_op_num_threads == 1 or settings.workers > 1:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not settings.prepacking:
        so.add_session_config_entry("session.disable_prepacking", "1")
    return so


def create_session(
    model_path: str | Path,
    settings: Settings | None = None,
    *,
    intra_threads: int | None = None,
) -> ort.InferenceSession:
    """Open ``model_path`` with the session options and providers of ``settings``."""
    settings = settings or Settings()
    path = Path(model_path)
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist")
    providers = resolve_providers(list(settings.providers))
    so = session_options(settings, intra_threads=intra_threads)
    provider_options: list[dict[str, Any]] = [{} for _ in providers]
    try:
        sess = ort.InferenceSession(os.fspath(path), sess_options=so, providers=providers,
                                    provider_options=provider_options)
    except Exception as e:  # ORT raises its own exception types; surface one of ours
        if providers != ["CPUExecutionProvider"]:
            log.warning("creating the session with %s failed (%s); retrying on CPU", providers, e)
            try:
                return ort.InferenceSession(os.fspath(path), sess_options=so,
                                            providers=["CPUExecutionProvider"])
            except Exception as e2:
                raise ModelError(f"cannot load {path}: {e2}") from e2
        raise ModelError(f"cannot load {path}: {e}") from e
    return sess

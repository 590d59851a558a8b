"""The OpenVINO backend (``--backend openvino``): the same exported ONNX file, run by OpenVINO's CPU plugin.

OpenVINO reads the ONNX graph itself, including the static int8 QDQ graphs our export writes (its
low-precision transformations turn QuantizeLinear/DequantizeLinear pairs into int8 kernels), so no
second export is needed. Optional: ``pip install openvino``.

Threading mirrors the ONNX Runtime backend: ``Settings.workers`` threads call ``run`` at once, so
the compiled model gets one stream per worker and ``threads_per_worker`` threads per stream, and
each calling thread keeps its own infer request (a request is not thread-safe; the compiled model is).
Inference precision is pinned to f32: on CPUs with bf16 (AVX-512 BF16, AMX) OpenVINO would
otherwise compute in bf16 by default, and a score must not change with the CPU it runs on.

An OpenVINO IR (``model.xml`` + ``model.bin``, ``encapure export --format openvino``) loads here too,
and only here. Its weights are mapped from ``model.bin`` by default; with ``Settings.openvino_mmap``
off they are read into memory and the read copy is dropped once the plugin has compiled (repacked)
them. ``Settings.openvino_dynamic_quantization_group_size`` turns on int8 activations for
weight-compressed IR (off by default: see BENCHMARKS.md "bge-reranker-v2-m3 memory").
"""

from __future__ import annotations

import functools
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from encapure.errors import ModelError
from encapure.settings import Settings


@dataclass(frozen=True)
class _Port:
    name: str
    shape: Sequence[Any]


def mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """Address ranges of this process's read-only mappings of ``path`` (Linux; empty elsewhere)."""
    if not sys.platform.startswith("linux"):
        return []
    target = str(path.resolve())
    try:
        with open("/proc/self/maps", encoding="utf-8") as f:
            lines = f.readlines()
    except OSError:
        return []
    out = []
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].strip() == target and "w" not in parts[1]:
            start, end = (int(x, 16) for x in parts[0].split("-"))
            out.append((start, end))
    return out


def release_pages(ranges: list[tuple[int, int]]) -> None:
    """``madvise(MADV_DONTNEED)`` the ranges: drop their resident pages from this process's RSS.

    Why: OpenVINO maps ``model.bin``; the CPU plugin repacks the compressed weights into its own
    (anonymous) buffers at the first inference, and the mapped pages it read stay counted in RSS
    beside that copy: the "double count", 149 MB of 294 for bge-reranker-v2-m3 int4. They are clean
    pages of a read-only file mapping, so dropping them loses nothing: what is read again (the rows of
    the word-embedding table a Gather looks up, which stays in the mapping) faults back in from the
    page cache. Done after every inference, so the embedding rows touched stay bounded by one batch's.
    """
    if not ranges:
        return
    madvise = _madvise()
    for start, end in ranges:
        madvise(start, end - start, 4)  # MADV_DONTNEED


@functools.cache
def _madvise() -> Any:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise


def _ports(ports: Any) -> list[_Port]:
    out = []
    for p in ports:
        dims = [d.get_length() if d.is_static else "?" for d in p.get_partial_shape()]
        out.append(_Port(p.get_any_name(), dims))
    return out


class OpenVINOSession:
    """A compiled OpenVINO model behind the engine's ``Session`` calls."""

    def __init__(self, path: Path, settings: Settings) -> None:
        try:
            import openvino as ov
        except ImportError as e:
            raise ModelError("the openvino backend needs the openvino package: pip install openvino") from e
        streams = settings.workers
        config: dict[str, Any] = {
            "INFERENCE_NUM_THREADS": settings.resolved_threads() * streams,
            "NUM_STREAMS": str(streams),
            "INFERENCE_PRECISION_HINT": "f32",
        }
        if settings.openvino_device.upper().startswith("CPU"):
            config["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = int(settings.openvino_dynamic_quantization_group_size)
        try:
            core = ov.Core()
            core.set_property({"ENABLE_MMAP": bool(settings.openvino_mmap)})
            model = core.read_model(str(path))
            self._compiled = core.compile_model(model, settings.openvino_device, config)
            # The compiled model holds what it needs (repacked weights); the read copy can go.
            del model
        except Exception as e:  # OpenVINO raises RuntimeError with multi-line text
            raise ModelError(f"OpenVINO cannot load {path}: {str(e).strip().splitlines()[0]}") from e
        # Mapped IR weights: their resident pages are dropped after each inference (see release_pages).
        # The ranges are read again each time: a range remembered from load could since have been
        # unmapped and reused by an anonymous allocation, which MADV_DONTNEED would zero.
        self._bin = path.with_suffix(".bin") if path.suffix.lower() == ".xml" and settings.openvino_mmap else None
        self._inputs = _ports(self._compiled.inputs)
        self._outputs = _ports(self._compiled.outputs)
        self._local = threading.local()

    def get_inputs(self) -> list[_Port]:
        return self._inputs

    def get_outputs(self) -> list[_Port]:
        return self._outputs

    def run(self, output_names: list[str] | None, feed: dict[str, Any]) -> list[Any]:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self._compiled.create_infer_request()
        result = request.infer(feed)
        if self._bin is not None:
            release_pages(mapped_ranges(self._bin))
        names = output_names or [p.name for p in self._outputs]
        # Copies: the request reuses its output buffers on the next call from this thread.
        return [result[self._compiled.output(n)].copy() for n in names]


def create_session(path: Path, settings: Settings) -> OpenVINOSession:
    return OpenVINOSession(path, settings)

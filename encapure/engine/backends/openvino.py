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
        names = output_names or [p.name for p in self._outputs]
        # Copies: the request reuses its output buffers on the next call from this thread.
        return [result[self._compiled.output(n)].copy() for n in names]


def create_session(path: Path, settings: Settings) -> OpenVINOSession:
    return OpenVINOSession(path, settings)

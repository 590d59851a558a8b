"""Inference backends: what runs the graph. The engine sees only a ``Session``.

A backend is one module here exposing ``create_session(model_path, settings) -> Session``; it is
registered in ``BACKENDS`` by name and chosen with ``Settings.backend`` (``--backend``,
``ENCAPURE_BACKEND``). Everything else (tokenizing, batching, pooling, the scheduler, HTTP) is shared,
so a new runtime is one new file plus one line below. Backends import their runtime lazily: the
serving install carries ONNX Runtime, OpenVINO is optional.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from encapure.errors import ModelError
from encapure.settings import Settings


class TensorInfo(Protocol):
    """A graph input or output, as the engine reads it (ONNX Runtime's ``NodeArg`` fits)."""

    @property
    def name(self) -> str: ...

    @property
    def shape(self) -> Sequence[Any]: ...


class Session(Protocol):
    """The three calls the engine makes of a loaded graph. ``run`` must be thread-safe."""

    def get_inputs(self) -> Sequence[TensorInfo]: ...

    def get_outputs(self) -> Sequence[TensorInfo]: ...

    def run(self, output_names: list[str] | None, feed: dict[str, Any]) -> list[Any]: ...


# name -> module implementing ``create_session(model_path, settings) -> Session``
BACKENDS: dict[str, str] = {
    "onnxruntime": "encapure.engine.backends.onnxruntime",
    "openvino": "encapure.engine.backends.openvino",
}


def open_backend(name: str, path: Path, settings: Settings) -> Session:
    """A session of the backend ``name`` (a ``BACKENDS`` key) on ``path``: no probe, no IR routing (what
    ``--backend auto``'s probes open each candidate with)."""
    module = importlib.import_module(BACKENDS[name])
    session: Session = module.create_session(path, settings)
    return session


def create_session(model_path: str | Path, settings: Settings | None = None) -> Session:
    """Open ``model_path`` with the backend ``settings.backend`` names (``auto``: the probe's pick).

    An OpenVINO IR (``.xml``) always opens on OpenVINO; asking for onnxruntime explicitly is an error,
    the default backend (not set by the user) gives way so ``encapure serve IR_FOLDER`` just works.
    """
    settings = settings or Settings()
    path = Path(model_path)
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist")
    name: str = settings.backend
    if path.suffix.lower() == ".xml":  # OpenVINO IR: only OpenVINO reads it
        if name == "onnxruntime" and "backend" in settings.model_fields_set:
            raise ModelError(
                f"{path.name} is an OpenVINO IR (encapure export --format openvino): it runs on --backend openvino "
                "(or auto), not onnxruntime; export with --format onnx for onnxruntime"
            )
        return open_backend("openvino", path, settings)
    if name == "auto":
        from encapure.engine.backends.auto import choose

        name = choose(path, settings, open_backend, list(BACKENDS))
    return open_backend(name, path, settings)

"""PyTorch -> ONNX for Hugging Face encoders.

Uses the TorchScript exporter (``dynamo=False``): with torch 2.13 and transformers 5 it still traces
HF encoders reliably and gives plain, fusion-friendly graphs with dynamic batch/sequence axes.
Models over 2 GB are written with external data in one side file (``model.onnx.data``).
"""

from __future__ import annotations

import inspect
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

from encapure.errors import ExportError, UnsupportedModelError

OPSET = 17
_TWO_GB = 2**31 - 1


def encoder_inputs(model: Any, config: dict[str, Any]) -> list[str]:
    """input_ids, attention_mask and token_type_ids when the model really uses segment ids."""
    params = inspect.signature(model.forward).parameters
    names = ["input_ids"]
    if "attention_mask" in params:
        names.append("attention_mask")
    tvs = config.get("type_vocab_size")
    if "token_type_ids" in params and isinstance(tvs, int) and tvs > 1:
        names.append("token_type_ids")
    return names


def _wrapper(model: Any, input_names: list[str], output_kind: str) -> Any:
    import torch

    class Wrapped(torch.nn.Module):
        """Fixes the signature and picks the one output the engine reads."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *args: Any) -> Any:
            kwargs = dict(zip(input_names, args, strict=True))
            out = self.model(**kwargs, return_dict=True)
            if output_kind == "logits":
                return out.logits
            return out.last_hidden_state

    return Wrapped().eval()


def export_onnx(
    model: Any,
    path: Path,
    *,
    input_names: list[str],
    output_name: str,
    output_kind: str,
    sample: dict[str, Any],
) -> None:
    """Trace ``model`` to ``path`` (fp32). Writes external data next to it when over 2 GB."""
    import onnx
    import torch

    wrapped = _wrapper(model, input_names, output_kind)
    args = tuple(torch.as_tensor(sample[n], dtype=torch.long) for n in input_names)
    axes: dict[str, dict[int, str]] = {n: {0: "batch", 1: "sequence"} for n in input_names}
    axes[output_name] = {0: "batch"} if output_kind == "logits" else {0: "batch", 1: "sequence"}
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    with tempfile.TemporaryDirectory(prefix="encapure-trace-", dir=path.parent) as tmp:
        raw = Path(tmp) / "model.onnx"
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    wrapped,
                    args,
                    str(raw),
                    input_names=input_names,
                    output_names=[output_name],
                    dynamic_axes=axes,
                    opset_version=OPSET,
                    do_constant_folding=True,
                    dynamo=False,
                )
        except OSError:
            raise
        except Exception as e:
            raise UnsupportedModelError(
                f"{type(model).__name__} could not be exported to ONNX: {str(e).strip().splitlines()[0]}"
            ) from e
        # Re-save: gives one self-contained file, or one consolidated external-data file when large.
        proto = onnx.load(str(raw), load_external_data=True)
        save_model(proto, path, large=n_bytes >= _TWO_GB - (64 << 20))


def save_model(proto: Any, path: Path, *, large: bool | None = None) -> None:
    import onnx

    if large is None:
        large = proto.ByteSize() >= _TWO_GB - (64 << 20) if _can_size(proto) else True
    data_name = path.name + ".data"
    if (path.parent / data_name).exists():
        os.remove(path.parent / data_name)
    if large:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
    else:
        onnx.save_model(proto, str(path))


def _can_size(proto: Any) -> bool:
    try:
        proto.ByteSize()
        return True
    except Exception:
        return False


def check_exportable_types(model: Any) -> None:
    if not hasattr(model, "forward") or not hasattr(model, "config"):
        raise ExportError(f"{type(model).__name__} is not a transformers model")

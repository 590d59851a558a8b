"""bge-reranker-v2-m3 (random weights, exact config): export time, file size, startup, RSS and 8x64 latency.

    python scripts/measure_bge_memory.py [--variants ort-int8,ov-int4,ov-int8] [--runs 100] [--out .work/bge-memory]
    python scripts/measure_bge_memory.py --probe-only   # re-measure the folders already exported
    python scripts/measure_bge_memory.py --probe-only --variants ov-int4 --only engine   # the engine rows only

Exports each variant once (``export_model`` on a seeded random ``XLMRobertaForSequenceClassification``
built from /work/shared/models/bge-reranker-v2-m3-arch), then measures every runtime configuration in
a fresh subprocess: the session alone (no tokenizer) -> RSS after load, ``--runs`` batches of 8 x 64
tokens (RSS after runs, p50), then the tokenizer the engine loads (``tokenizer.json``) -> RSS with it.
Startup = session creation + tokenizer load. Also, for OpenVINO IR, batch invariance: each of 8 rows of
different lengths scored alone vs in the padded batch (max |Δ| of the logits). 2 threads, 1 stream.
RSS is split into anonymous (heap, repacked weights) and file-backed (mapped model.bin pages).
Results: printed table + <out>/results.json. Random weights cost what real ones do; scores mean nothing.

Engine rows (``ENGINE_CONFIGS``): what ``encapure serve`` holds, measured the way the issue's bar reads.
A fresh process runs ``load_model`` (tokenizer the export recorded, SentencePiece for XLM-R; warm-up),
RSS at ready, then ``--runs`` requests of 8 WikiQA-test-gold pairs, each cut to exactly 64 tokens
(the document repeated until truncation bites), RSS after. Scores of 16 fixed pairs are taken at ready
and again after the requests (must be identical), and compared across the rows (mmap on, with and
without paging the mapped weights out, and mmap off: must agree within float noise).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BGE_ARCH = Path(os.environ.get("ENCAPURE_SHARED", "/work/shared")) / "models" / "bge-reranker-v2-m3-arch"

# variant -> (export format, precision)
VARIANTS = {"ort-int8": ("onnx", "int8"), "ov-int4": ("openvino", "int4"), "ov-int8": ("openvino", "int8")}
# runtime configurations measured per exported variant: (label, backend, mmap, dyn-quant group)
# (label, backend, mmap, dq group, release mapped weights)
CONFIGS = {
    "ort-int8": [("ORT int8 (dynamic)", "onnxruntime", True, 0, False)],
    "ov-int4": [("OV int4 IR, mmap on, page-out on, dq off", "openvino", True, 0, True),
                ("OV int4 IR, mmap on, page-out off, dq off", "openvino", True, 0, False),
                ("OV int4 IR, mmap on, page-out on, dq 128", "openvino", True, 128, True),
                ("OV int4 IR, mmap off, dq off", "openvino", False, 0, False)],
    "ov-int8": [("OV int8-weights IR, mmap on, page-out on, dq off", "openvino", True, 0, True),
                ("OV int8-weights IR, mmap off, dq off", "openvino", False, 0, False)],
}
# engine rows, OpenVINO IR variants only: (label, mmap, release mapped weights)
ENGINE_CONFIGS = [("engine, mmap on, page-out on (default)", True, True),
                  ("engine, mmap on, page-out off", True, False),
                  ("engine, mmap off", False, False)]

_ENGINE_PROBE = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np
from encapure.engine.loading import load_model
from encapure.settings import Settings

def rss():
    out = {}
    for line in open("/proc/self/status"):
        if line.startswith(("VmRSS", "RssAnon", "RssFile")):
            k, v = line.split(":")
            out[k] = int(v.split()[0]) / 1024
    return out

folder, mmap, release, runs = sys.argv[1], sys.argv[2] == "1", sys.argv[3] == "1", int(sys.argv[4])
pairs = [tuple(p) for p in json.loads(sys.stdin.read())]
settings = Settings(workers=1, threads_per_worker=2, max_length=64, openvino_mmap=mmap,
                    openvino_release_mapped_weights=release)
model = load_model(folder, settings=settings)
ready_s = time.perf_counter() - t0
at_ready = rss()
fixed = pairs[:16]
def score(batch):
    prep = model.prepare_pair_list(batch)
    return np.asarray(model.forward(prep.units), dtype=np.float64).ravel(), [len(u.ids) for u in prep.units]
first = np.concatenate([score(fixed[i:i + 8])[0] for i in (0, 8)])
lat, lengths = [], set()
for i in range(runs):
    batch = pairs[(i * 8) % len(pairs):][:8]
    t = time.perf_counter()
    _, lens = score(batch)
    lat.append(time.perf_counter() - t)
    lengths.update(lens)
after = rss()
again = np.concatenate([score(fixed[i:i + 8])[0] for i in (0, 8)])
lat.sort()
print(json.dumps({"tokenizer": model.tokenizer_kind, "startup_s": round(ready_s, 2),
                  "rss_ready_mb": round(at_ready["VmRSS"]), "anon_ready_mb": round(at_ready["RssAnon"]),
                  "file_ready_mb": round(at_ready["RssFile"]),
                  "rss_after_mb": round(after["VmRSS"]), "anon_after_mb": round(after["RssAnon"]),
                  "file_after_mb": round(after["RssFile"]), "requests": runs, "token_lengths": sorted(lengths),
                  "p50_ms": round(1000 * lat[len(lat) // 2], 1), "min_ms": round(1000 * lat[0], 1),
                  "repeat_max_abs": float(np.abs(first - again).max()), "scores": first.tolist()}))
"""

_PROBE = r"""
import json, sys, time
import numpy as np
folder, backend, mmap, dq, runs = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4]), int(sys.argv[5])
release = sys.argv[6] == "1"

def rss():
    out = {}
    for line in open("/proc/self/status"):
        if line.startswith(("VmRSS", "RssAnon", "RssFile")):
            k, v = line.split(":")
            out[k] = int(v.split()[0]) / 1024
    return out

from pathlib import Path
from encapure.engine.backends import create_session
from encapure.manifest import Manifest
from encapure.settings import Settings
m = Manifest.load(folder)
settings = Settings(backend=backend, workers=1, threads_per_worker=2, openvino_mmap=mmap,
                    openvino_dynamic_quantization_group_size=dq, openvino_release_mapped_weights=release)
base = rss()
t0 = time.perf_counter()
s = create_session(Path(folder) / m.model_file, settings)
load_s = time.perf_counter() - t0
after_load = rss()
rng = np.random.default_rng(0)
ids = rng.integers(5, 250000, (8, 64)).astype(np.int64); ids[:, 0] = 0; ids[:, -1] = 2
names = [i.name for i in s.get_inputs()]
def feed(ids, mask):
    f = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    return {k: v for k, v in f.items() if k in names}
full = feed(ids, np.ones_like(ids))
t = time.perf_counter(); s.run(None, full); first_s = time.perf_counter() - t
lat = []
for _ in range(runs):  # new random ids each request: the embedding rows touched vary as with real traffic
    ids_r = rng.integers(5, 250000, (8, 64)).astype(np.int64); ids_r[:, 0] = 0; ids_r[:, -1] = 2
    f = feed(ids_r, np.ones_like(ids_r))
    t = time.perf_counter(); s.run(None, f); lat.append(time.perf_counter() - t)
after_runs = rss()
# batch invariance: rows of different lengths, padded batch vs each row alone
lengths = np.linspace(64, 6, 8).astype(int)
mask = np.zeros_like(ids)
for r, n in enumerate(lengths):
    mask[r, :n] = 1
pids = np.where(mask == 1, ids, 1)
batched = s.run(None, feed(pids, mask))[0]
alone = np.concatenate([s.run(None, feed(pids[r:r + 1, :n], mask[r:r + 1, :n]))[0] for r, n in enumerate(lengths)])
inv = float(np.abs(batched - alone).max())
after_shapes = rss()
t = time.perf_counter()
from tokenizers import Tokenizer
tok = Tokenizer.from_file(str(Path(folder) / m.tokenizer_file))
tok_s = time.perf_counter() - t
with_tok = rss()
print(json.dumps({"base_rss_mb": round(base["VmRSS"]), "session_load_s": round(load_s, 2),
                  "startup_s": round(load_s + tok_s, 2),
                  "rss_after_load_mb": round(after_load["VmRSS"]), "anon_after_load_mb": round(after_load["RssAnon"]),
                  "file_after_load_mb": round(after_load["RssFile"]),
                  "rss_after_runs_mb": round(after_runs["VmRSS"]), "anon_after_runs_mb": round(after_runs["RssAnon"]),
                  "file_after_runs_mb": round(after_runs["RssFile"]),
                  "rss_after_other_shapes_mb": round(after_shapes["VmRSS"]),
                  "rss_with_tokenizer_mb": round(with_tok["VmRSS"]),
                  "tokenizer_mb": round(with_tok["VmRSS"] - after_runs["VmRSS"]),
                  "first_run_ms": round(1000 * first_s), "p50_ms": round(1000 * float(np.median(lat)), 1),
                  "min_ms": round(1000 * min(lat), 1), "runs": runs, "batch_invariance_max_abs": inv}))
"""


def cpu_isa() -> str:
    from encapure.engine.backends.auto import cpu_signature

    return cpu_signature()


def export(variant: str, out: Path, parity: bool = True) -> dict[str, Any]:
    import torch
    from transformers import AutoConfig, AutoTokenizer, XLMRobertaForSequenceClassification

    from encapure.export import export_model

    fmt, precision = VARIANTS[variant]
    config = AutoConfig.from_pretrained(str(BGE_ARCH))
    tok = AutoTokenizer.from_pretrained(str(BGE_ARCH))
    torch.manual_seed(0)
    model = XLMRobertaForSequenceClassification(config).eval()
    t = time.perf_counter()
    res = export_model(model, out, precision=precision, tokenizer=tok, format=fmt, progress=True,
                       check_parity=parity)
    export_s = time.perf_counter() - t
    size = sum(p.stat().st_size for p in out.iterdir() if p.name.startswith(("model.onnx", "model.xml", "model.bin")))
    return {"export_s": round(export_s, 1), "steps_s": res.timings, "size_mb": round(size / 1e6, 1),
            "quantization": res.manifest.quantization,
            "parity": {k: v for k, v in res.parity.items() if k not in ("quantization", "timings_s")}}


def _run_probe(args: list[str], stdin: str | None = None) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", *args], capture_output=True, text=True, timeout=3600, env=env,
                          input=stdin)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def probe(folder: Path, backend: str, mmap: bool, dq: int, runs: int, release: bool) -> dict[str, Any]:
    return _run_probe([_PROBE, str(folder), backend, "1" if mmap else "0", str(dq), str(runs), "1" if release else "0"])


def long_pairs(n: int = 800) -> list[tuple[str, str]]:
    """WikiQA-test-gold pairs whose document is repeated until it is well past 64 tokens: every
    request is then 8 x 64 tokens after truncation, with real text's token ids."""
    from encapure.evaluation import load_dataset

    path = BGE_ARCH.parents[1] / "data" / "wikiqa" / "WikiQA-test-gold.tsv"
    out = []
    for g in load_dataset(path):
        for d in g.documents:
            out.append((g.query, " ".join([d] * max(1, 600 // max(len(d), 1) + 1))))
    return out[:n]


def engine_probe(folder: Path, mmap: bool, release: bool, runs: int, pairs: list[tuple[str, str]]) -> dict[str, Any]:
    return _run_probe([_ENGINE_PROBE, str(folder), "1" if mmap else "0", "1" if release else "0", str(runs)],
                      stdin=json.dumps(pairs))  # too long for an argument


def table(results: dict[str, Any]) -> str:
    lines = ["| variant | file | startup | first run | RSS after load (anon/file) | after N runs (anon/file) | "
             "after other shapes | + tokenizer | 8x64 p50 (min) | batch invariance |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for variant, res in results.get("variants", {}).items():
        ex = res.get("export", {})
        for label, p in res.get("configs", {}).items():
            if "error" in p:
                lines.append(f"| {label} | | | | error: {p['error']} | | | | |")
                continue
            lines.append(
                f"| {label} | {ex.get('size_mb', '?')} MB | {p['startup_s']} s | {p['first_run_ms']} ms | "
                f"{p['rss_after_load_mb']} MB ({p['anon_after_load_mb']}/{p['file_after_load_mb']}) | "
                f"{p['rss_after_runs_mb']} MB ({p['anon_after_runs_mb']}/{p['file_after_runs_mb']}) | "
                f"{p.get('rss_after_other_shapes_mb', '?')} MB | "
                f"{p['rss_with_tokenizer_mb']} MB (+{p['tokenizer_mb']}) | {p['p50_ms']:.0f} ({p['min_ms']:.0f}) ms | "
                f"{p['batch_invariance_max_abs']:.1e} |")
        del variant
    return "\n".join(lines)


def engine_table(results: dict[str, Any]) -> str:
    lines = ["| variant | startup (to ready) | RSS at ready (anon/file) | N | after N requests (anon/file) | "
             "8x64 p50 (min) | repeat max abs Δ | vs first row max abs Δ |",
             "|---|---|---|---|---|---|---|---|"]
    for variant, res in results.get("variants", {}).items():
        rows = res.get("engine", {})
        ref = next((p["scores"] for p in rows.values() if "scores" in p), None)
        for label, p in rows.items():
            if "error" in p:
                lines.append(f"| {variant}: {label} | error: {p['error']} | | | | | | |")
                continue
            vs = max(abs(a - b) for a, b in zip(p["scores"], ref, strict=True)) if ref else float("nan")
            lines.append(
                f"| {variant}: {label} ({p['tokenizer']}) | {p['startup_s']} s | {p['rss_ready_mb']} MB "
                f"({p['anon_ready_mb']}/{p['file_ready_mb']}) | {p['requests']} | {p['rss_after_mb']} MB ({p['anon_after_mb']}/"
                f"{p['file_after_mb']}) | {p['p50_ms']:.0f} ({p['min_ms']:.0f}) ms | {p['repeat_max_abs']:.1e} | "
                f"{vs:.1e} |")
    return "\n".join(lines)


MD = ROOT / "benchmarks" / "results" / "bge-reranker-v2-m3-memory.md"


def section(results: dict[str, Any], runs: int) -> str:
    """The BENCHMARKS.md section (benchmarks/report.py includes the file this writes)."""
    c = results["conditions"]
    exports = []
    for v, res in results.get("variants", {}).items():
        ex = res.get("export") or {}
        steps = ex.get("steps_s") or {}
        parity = ex.get("parity") or {}
        work = sum(t for k, t in steps.items() if k not in ("total", "Verifying against PyTorch"))
        pline = (f", parity vs PyTorch max |Δ| {parity['max_abs_diff']:.3f}, cosine {parity['cosine']:.3f}"
                 if parity.get("max_abs_diff") is not None else "")
        exports.append(f"- `{v}`: {ex.get('size_mb', '?')} MB; export {work:.0f} s without the PyTorch parity step{pline}.")
    has_session = any(r.get("configs") for r in results.get("variants", {}).values())
    return "\n".join([
        "## bge-reranker-v2-m3 memory (architecture, random weights): ONNX Runtime int8 vs OpenVINO int4 IR\n",
        f"`python scripts/measure_bge_memory.py` on {c['cpu']}, **shared CPU** (load average "
        f"{c['loadavg_start'][0]:.1f} at start: latencies are noisy, compare within the table).",
        *([] if has_session else [""]),
        *([] if not has_session else [f"One fresh process "
        f"per row, 1 stream x 2 threads, the session alone (no tokenizer, no server): RSS after load, after {runs} "
        "requests of 8 x 64 random token ids (new ids each request), after 9 more of other shapes; then the "
        "`tokenizers` XLM-R tokenizer (`tokenizer.json`) loaded into the same process. Startup = session "
        "creation + tokenizer load (the first request also pays the plugin's weight repacking: `first run`). "
        "mmap = `--openvino-mmap`, dq = `--openvino-dynamic-quantization-group-size`. Batch invariance = max "
        "|Δ logit| between 8 rows of different lengths scored alone and in one padded batch.\n"]),
        *exports, "",
        *([table(results), ""] if has_session else []),
        "Through the engine (`load_model` with the tokenizer the export recorded and its warm-up, 1 worker x 2 "
        "threads, max length 64; N requests of 8 WikiQA-test-gold pairs, each exactly 64 tokens; a fresh "
        "process per row, RSS at ready and after the requests; scores of 16 fixed pairs at ready vs after the "
        "requests, and vs the first row):\n",
        engine_table(results), ""])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="ov-int4,ort-int8,ov-int8")
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--out", type=Path, default=ROOT / ".work" / "bge-memory")
    ap.add_argument("--probe-only", action="store_true")
    ap.add_argument("--skip-export", default="", help="variants already exported (their folders are reused)")
    ap.add_argument("--only", choices=["all", "session", "engine"], default="all",
                    help="session: the session-only rows; engine: the engine rows (OpenVINO IR variants)")
    ap.add_argument("--engine-rows", default="", help="indices into ENGINE_CONFIGS to measure (default: all)")
    ap.add_argument("--no-parity", action="store_true",
                    help="skip the PyTorch parity check (10 minutes per variant on a busy 2-core machine)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    res_path = args.out / "results.json"
    results: dict[str, Any] = json.loads(res_path.read_text()) if res_path.exists() else {}
    results["conditions"] = {"cpu": cpu_isa(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
                             "loadavg_start": os.getloadavg(), "threads": 2, "note": "shared CPU"}
    variants = results.setdefault("variants", {})
    names = args.variants.split(",")
    if not args.probe_only:  # export all first: the probes then run without an export beside them
        for v in names:
            if v in args.skip_export.split(","):
                continue
            variants.setdefault(v, {})["export"] = export(v, args.out / v, parity=not args.no_parity)
            print(f"{v}: export {json.dumps(variants[v]['export'])}", flush=True)
            res_path.write_text(json.dumps(results, indent=2) + "\n")
    for v in names if args.only in ("all", "session") else []:
        for label, backend, mmap, dq, release in CONFIGS[v]:
            p = probe(args.out / v, backend, mmap, dq, args.runs, release)
            variants.setdefault(v, {}).setdefault("configs", {})[label] = p
            print(f"{label}: {json.dumps(p)}", flush=True)
            res_path.write_text(json.dumps(results, indent=2) + "\n")
    pairs = long_pairs()
    for v in names if args.only in ("all", "engine") else []:
        if VARIANTS[v][0] != "openvino":
            continue
        rows = [int(i) for i in args.engine_rows.split(",")] if args.engine_rows else range(len(ENGINE_CONFIGS))
        for label, mmap, release in (ENGINE_CONFIGS[i] for i in rows):
            p = engine_probe(args.out / v, mmap, release, args.runs, pairs)
            variants.setdefault(v, {}).setdefault("engine", {})[label] = p
            print(f"{v} {label}: {json.dumps({k: x for k, x in p.items() if k != 'scores'})}", flush=True)
            res_path.write_text(json.dumps(results, indent=2) + "\n")
    results["conditions"]["loadavg_end"] = os.getloadavg()
    res_path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{results['conditions']['cpu']}, 2 threads, {args.runs} runs, shared CPU\n")
    print(table(results))
    print(engine_table(results))
    MD.write_text(section(results, args.runs) + "\n")
    print(f"wrote {MD}")


if __name__ == "__main__":
    main()

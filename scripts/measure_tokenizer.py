"""RSS at ready of an exported XLM-R model with each tokenizer, and tokenization speed of both (issue 11).

    python scripts/measure_tokenizer.py MODEL_FOLDER [--pairs 1000] [--requests 20]

MODEL_FOLDER is an export whose manifest says ``"tokenizer": "sentencepiece"`` (bge-reranker-v2-m3's
architecture with random weights: see scripts/measure_export.py). For ``--tokenizer hf`` and
``sentencepiece`` in turn, a fresh process loads the engine (2 threads, one worker), reports load time
and RSS at ready, then scores ``--requests`` batches of 8 WikiQA pairs (cut at 64 tokens) and reports
RSS again. Then one process times both tokenizers on the first ``--pairs`` WikiQA-test-gold pairs
(engine truncation mode "pair", max length 512), so the ratio is measured within one run.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_PROBE = r"""
import json, sys, time
t0 = time.perf_counter()
from encapure.engine.loading import load_model
from encapure.settings import Settings
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
model = load_model(sys.argv[1], settings=Settings(tokenizer=sys.argv[2], workers=1, threads_per_worker=2,
                                                   max_length=64))
ready_s = time.perf_counter() - t0
rss_ready = rss()
pairs = json.loads(sys.argv[3])
lat = []
for i in range(int(sys.argv[4])):
    batch = pairs[(i * 8) % len(pairs):][:8]
    t = time.perf_counter()
    prep = model.prepare_pair_list([tuple(p) for p in batch])
    model.forward(prep.units)
    lat.append(time.perf_counter() - t)
lat.sort()
print(json.dumps({"tokenizer": model.tokenizer_kind, "startup_s": round(ready_s, 2), "rss_ready_mb": round(rss_ready),
                  "rss_after_requests_mb": round(rss()), "p50_8_pairs_ms": round(1000 * lat[len(lat) // 2], 1)}))
"""


def wikiqa_pairs(n: int) -> list[tuple[str, str]]:
    from experiments._common import wikiqa

    out = [(g.query, d) for g in wikiqa() for d in g.documents]
    return out[:n]


def probe(folder: Path, kind: str, pairs: list[tuple[str, str]], requests: int) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-c", _PROBE, str(folder), kind, json.dumps(pairs[:200]), str(requests)],
                          capture_output=True, text=True, timeout=1800, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def speed(folder: Path, pairs: list[tuple[str, str]]) -> dict[str, Any]:
    from tokenizers import Tokenizer

    from encapure.engine.spm_tokenizer import SPM_FILE, SpmTokenizer

    out: dict[str, Any] = {}
    toks: dict[str, Any] = {"hf": Tokenizer.from_file(str(folder / "tokenizer.json")), "sentencepiece": SpmTokenizer(folder / SPM_FILE)}
    ids = {}
    for name, tok in toks.items():
        tok.no_padding()
        tok.enable_truncation(512, strategy="only_second")
        tok.encode_batch(pairs[:50])
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            encs = tok.encode_batch(pairs)
            best = min(best, time.perf_counter() - t)
        ids[name] = [e.ids for e in encs]
        out[f"{name}_pairs_per_s"] = round(len(pairs) / best)
    out["same_ids"] = ids["hf"] == ids["sentencepiece"]
    out["ratio_sentencepiece_vs_hf"] = round(out["sentencepiece_pairs_per_s"] / out["hf_pairs_per_s"], 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", type=Path)
    ap.add_argument("--pairs", type=int, default=1000)
    ap.add_argument("--requests", type=int, default=20)
    args = ap.parse_args()
    pairs = wikiqa_pairs(args.pairs)
    flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0] if Path("/proc/cpuinfo").is_file() else ""
    isa = "AVX-512 VNNI" if "avx512_vnni" in flags else ("AVX2" if "avx2" in flags else platform.machine())
    results: dict[str, Any] = {"isa": isa, "cpu": platform.processor() or platform.machine()}
    for kind in ("hf", "sentencepiece"):
        results[kind] = probe(args.folder, kind, pairs, args.requests)
        print(kind, json.dumps(results[kind]), flush=True)
    results["tokenize_1000_wikiqa_pairs"] = speed(args.folder, pairs)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

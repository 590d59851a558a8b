"""Qwen3-Reranker-0.6B architecture (random weights): export time, size, RSS at ready, latency.

    python scripts/measure_qwen3.py [--precisions int8,int4] [--out .work/measure-qwen3]

Random weights built from ../shared/models/qwen3-reranker-0.6b-arch/config.json cost exactly what
the real model costs (export time, file size, memory, latency); their scores mean nothing, so the
parity figures compare the export with PyTorch's yes/no formula on the same random weights.
Per precision: export (timed; parity run separately on a subset of the standard samples, default
and custom instruction, so the timing is the export's), then in a fresh subprocess: the engine
loads the folder as ``encapure serve`` does (tokenizer, session, warm-up) -> load time and RSS at
ready; then 8 pairs x 128 tokens (template included) through ``Reranker.compute``, 2 threads ->
median latency and pairs/s. Writes <out>/results.json and benchmarks/results/qwen3-reranker-0.6b.md
(included in BENCHMARKS.md by benchmarks/report.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ARCH = Path(os.environ.get("ENCAPURE_SHARED", ROOT.parent / "shared")) / "models" / "qwen3-reranker-0.6b-arch"
SECTION = ROOT / "benchmarks" / "results" / "qwen3-reranker-0.6b.md"

_PROBE = r"""
import json, sys, time
import numpy as np
t0 = time.perf_counter()
from encapure import Reranker
from encapure.settings import Settings
rr = Reranker.from_pretrained(sys.argv[1], settings=Settings(max_length=128, workers=1, threads_per_worker=2))
load_s = time.perf_counter() - t0
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
rss_ready = rss()
docs = [f"Document {i}: " + "Photosynthesis converts light energy into chemical energy stored in glucose. " * 20
        for i in range(8)]
q = "how do plants turn light into energy"
out = rr.compute(q, docs)
assert all(t == 128 for t in out.tokens), out.tokens
lat, cpu = [], []
for _ in range(int(sys.argv[2])):
    t, c = time.perf_counter(), time.process_time()
    rr.compute(q, docs)
    lat.append(time.perf_counter() - t); cpu.append(time.process_time() - c)
med = float(np.median(lat))
print(json.dumps({"load_s": round(load_s, 2), "rss_ready_mb": round(rss_ready), "rss_after_runs_mb": round(rss()),
                  "latency_8x128_ms_median": round(1000 * med, 1), "latency_8x128_ms_min": round(1000 * min(lat), 1),
                  "pairs_per_s": round(8 / med, 2), "cpu_s_per_call_median": round(float(np.median(cpu)), 2)}))
"""

# One long pair (document cut to fill the window): time and peak memory grow with the window.
_LONG = r"""
import json, resource, sys, time
from encapure import Reranker
from encapure.settings import Settings
n = int(sys.argv[2])
rr = Reranker.from_pretrained(sys.argv[1], settings=Settings(max_length=n, workers=1, threads_per_worker=2))
doc = "Photosynthesis converts light energy into chemical energy stored in glucose. " * (n // 10)
t, c = time.perf_counter(), time.process_time()
out = rr.compute("how do plants make energy", [doc])
print(json.dumps({"tokens": out.tokens[0], "wall_s": round(time.perf_counter() - t, 1),
                  "cpu_s": round(time.process_time() - c, 1),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
"""


def long_pair(folder: Path, tokens: int) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-c", _LONG, str(folder), str(tokens)], capture_output=True, text=True,
                          timeout=3600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        return {"tokens": tokens, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def isa() -> str:
    flags = ""
    model = platform.processor()
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in text.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("Flags:"):
                flags = line
    except (OSError, subprocess.SubprocessError):
        pass
    have = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "avx_vnni") if re.search(rf"\b{f}\b", flags)]
    return f"{model}; {', '.join(have) or 'ISA unknown'}; {os.cpu_count()} cores visible"


def probe(folder: Path, runs: int) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-c", _PROBE, str(folder), str(runs)], capture_output=True, text=True,
                          timeout=3600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def measure(precision: str, out: Path, runs: int, parity_pairs: int) -> dict[str, Any]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from encapure.export import export_model, qwen3

    torch.manual_seed(0)
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(ARCH)), dtype=torch.float32).eval()
    build_s = time.perf_counter() - t
    folder = out / f"qwen3-reranker-0.6b-{precision}"
    t = time.perf_counter()
    res = export_model(model, folder, precision=precision, task="rerank", tokenizer=ARCH, check_parity=False,
                       progress=True)
    export_s = time.perf_counter() - t
    r: dict[str, Any] = {
        "build_random_model_s": round(build_s, 1),
        "export_s": round(export_s, 1),
        "steps_s": res.timings,
        "size_mb": round(res.size_bytes / 1e6, 1),
        "quantization": {k: v for k, v in res.manifest.quantization.items() if k != "excluded_nodes"},
        "max_length": res.manifest.max_length,
    }
    t = time.perf_counter()
    parity = qwen3.check(model, folder, 9693, 2152, max_length=512, limit=parity_pairs)
    r["parity"] = {k: v for k, v in parity.items() if k != "reference"}
    r["parity_s"] = round(time.perf_counter() - t, 1)
    del model
    r.update(probe(folder, runs))
    return r


def section(results: dict[str, Any]) -> str:
    c = results["conditions"]
    L = ["## Qwen3-Reranker-0.6B architecture (random weights), engine\n",
         f"`python scripts/measure_qwen3.py` on {c['date']}: {c['cpu']}. Load average {c['loadavg_start']} at start, "
         f"{c['loadavg_end']} at end{' (the CPU was shared with other work: absolute times are pessimistic)' if c['shared'] else ''}. "
         "Random weights from `../shared/models/qwen3-reranker-0.6b-arch` (28 layers, hidden 1024, vocab 151,669) cost "
         "what the real model costs; its scores mean nothing, so parity is against PyTorch's yes/no formula on the same "
         "weights. Export = trace + quantize (parity timed apart). Load and RSS: a fresh process loading the folder "
         "through the engine (tokenizer, session, warm-up), as `encapure serve` does. Latency: 8 pairs x 128 tokens "
         "(template included), one `Reranker.compute` call, 2 threads, median of "
         f"{c['runs']}.\n",
         "CPU s = CPU time of the process (both threads) per call: less sensitive than wall time to other work on "
         "the cores; with 2 threads on 2 otherwise idle cores the wall time would be about half of it.\n",
         "| precision | int8/int4 recipe | export s | files MB | load s | RSS at ready MB | 8 x 128 ms (median) | pairs/s "
         "| CPU s per 8 x 128 | parity vs PyTorch (max abs Δ logit, Spearman, pairs) |",
         "|---|---|---|---|---|---|---|---|---|---|"]
    for prec, r in results["precisions"].items():
        q = r.get("quantization") or {}
        recipe = q.get("name") or (f"{q.get('bits')}-bit weight-only, block {q.get('block_size')}" if q.get("bits") else "–")
        p = r.get("parity") or {}
        L.append(f"| {prec} | {recipe} | {r.get('export_s')} | {r.get('size_mb'):,.0f} | {r.get('load_s', '–')} | "
                 f"{r.get('rss_ready_mb', '–')} | {r.get('latency_8x128_ms_median', '–')} | {r.get('pairs_per_s', '–')} | "
                 f"{r.get('cpu_s_per_call_median', '–')} | "
                 f"{p.get('max_abs_diff', float('nan')):.3f}, {p.get('spearman', float('nan')):.3f}, {p.get('n_items')} |")
    L.append("")
    long = results.get("long_pairs") or {}
    for prec, rows in long.items():
        lc = results.get("long_pairs_conditions") or {}
        L.append(f"One long pair at {prec} (the document cut to fill a window of that many tokens; a fresh process each; "
                 f"`--probe-only --long`, {lc.get('date', '')}, load average {lc.get('loadavg_start')} -> "
                 f"{lc.get('loadavg_end')}): attention is quadratic in the window, so the default 8192-token window costs far more "
                 "than short pairs — pass `--max-length` to bound it on CPU servers.\n")
        L.append("| tokens | wall s | CPU s | peak RSS MB |")
        L.append("|---|---|---|---|")
        for row in rows:
            L.append(f"| {row.get('tokens')} | {row.get('wall_s', '–')} | {row.get('cpu_s', '–')} | "
                     f"{row.get('peak_rss_mb', row.get('error', '–'))} |")
        L.append("")
    return "\n".join(L) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--precisions", default="int8,int4")
    ap.add_argument("--out", type=Path, default=ROOT / ".work" / "measure-qwen3")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--parity-pairs", type=int, default=8, help="sample pairs per instruction (x2 instructions)")
    ap.add_argument("--probe-only", action="store_true",
                    help="re-run only the load/latency probe on the folders of a previous run (keeps its export figures)")
    ap.add_argument("--long", default="", help="with --probe-only: window sizes for the one-long-pair probe at int8 "
                    "(e.g. 1024,4096)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any]
    if args.probe_only:
        results = json.loads((args.out / "results.json").read_text())
        if args.long:
            start = [round(x, 2) for x in os.getloadavg()]
            folder = args.out / "qwen3-reranker-0.6b-int8"
            results["long_pairs"] = {"int8": [long_pair(folder, int(n)) for n in args.long.split(",")]}
            results["long_pairs_conditions"] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                                "loadavg_start": start,
                                                "loadavg_end": [round(x, 2) for x in os.getloadavg()]}
            print(json.dumps(results["long_pairs"]), flush=True)
            (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
            SECTION.write_text(section(results))
            print(section(results))
            return
        results["conditions"].update(loadavg_start=[round(x, 2) for x in os.getloadavg()], runs=args.runs,
                                     date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()) + " (probe re-run)")
        for precision, r in results["precisions"].items():
            r.update(probe(args.out / f"qwen3-reranker-0.6b-{precision}", args.runs))
            print(f"qwen3-reranker-0.6b (random) {precision}: {json.dumps(r)}", flush=True)
        finish(results, args.out)
        return
    results = {"conditions": {"cpu": isa(), "loadavg_start": [round(x, 2) for x in os.getloadavg()],
                                              "runs": args.runs,
                                              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
                               "precisions": {}}
    for precision in args.precisions.split(","):
        results["precisions"][precision] = measure(precision, args.out, args.runs, args.parity_pairs)
        print(f"qwen3-reranker-0.6b (random) {precision}: {json.dumps(results['precisions'][precision])}", flush=True)
    finish(results, args.out)


def finish(results: dict[str, Any], out: Path) -> None:
    end = [round(x, 2) for x in os.getloadavg()]
    results["conditions"]["loadavg_end"] = end
    results["conditions"]["shared"] = max(results["conditions"]["loadavg_start"][0], end[0]) > 2.5
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    text = section(results)
    SECTION.parent.mkdir(parents=True, exist_ok=True)
    SECTION.write_text(text)
    print(text)


if __name__ == "__main__":
    main()

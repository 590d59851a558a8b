"""bge-reranker-v2-m3 (random weights, exact config): export time, file size, startup, RSS and 8x64 latency.

    python scripts/measure_bge_memory.py [--variants ort-int8,ort-int4,ov-int4] [--runs 100] [--out .work/bge-memory]
    python scripts/measure_bge_memory.py --probe-only   # re-measure the folders already exported
    python scripts/measure_bge_memory.py --render --md benchmarks/results/bge-reranker-v2-m3-memory.md  # no measuring
    python scripts/measure_bge_memory.py --probe-only --folder ort-int8=PATH --folder ort-int4=PATH \
        --folder ov-int4=PATH --md benchmarks/results/bge-reranker-v2-m3-memory.md   # the BENCHMARKS.md section
    python scripts/measure_bge_memory.py --probe-only --variants ov-int4 --only engine   # the engine rows only
    python scripts/measure_bge_memory.py --variants ov-int4-r0.8,ov-int4-r1.0 --only engine --rounds 2
    python scripts/measure_bge_memory.py --probe-only --variants ov-int4 --only server    # `encapure serve` rows
    python scripts/measure_bge_memory.py --probe-only --variants ov-int4 --only startup   # where start-up goes

The default (``--only server``, server row 0): ``encapure serve --model <folder>`` with no other
argument, i.e. what a user gets (``--backend auto``, the worker count sized by the model, idle memory
release), for int8 and int4 ONNX (ONNX Runtime, the backend the auto probe picks for them) and the int4
OpenVINO IR: file size, seconds to the first /ready 200, RSS at ready, after ``--runs`` sequential
requests of 8 x 64 tokens (read as the last response arrives) and one idle second later (the server's
idle release has run), c=1 p50. ``--folder VARIANT=PATH`` measures an export made elsewhere (read only).

``ov-int4-r1.0`` / ``ov-int4-r0.8`` pin the int4 recipe's int4 share (``openvino_ir.INT4_RATIO``) so two
recipes can be measured side by side; ``--rounds N`` alternates the variants (A, B, A, B...) and keeps
each row's best time and highest RSS. Server rows (``SERVER_CONFIGS``, every variant): ``encapure serve``
in a fresh process, launch to the first /ready 200, the process's RSS at ready and after ``--runs``
sequential /rerank requests of 8 pairs of exactly 64 tokens (documents cut at a token's end). Startup: each stage
of what ``serve`` does before /ready, timed alone in one process. The section is written to
``<out>/section.md`` (``--md`` to write the benchmark page, whose hand-written notes it replaces).

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
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BGE_ARCH = Path(os.environ.get("ENCAPURE_SHARED", "/work/shared")) / "models" / "bge-reranker-v2-m3-arch"

# variant -> (export format, precision)
VARIANTS = {"ort-int8": ("onnx", "int8"), "ort-int4": ("onnx", "int4"), "ov-int4": ("openvino", "int4"),
            "ov-int8": ("openvino", "int8"),
            "ov-int4-r1.0": ("openvino", "int4"), "ov-int4-r0.8": ("openvino", "int4")}
# int4 variants pinned to an int4 share (``openvino_ir.INT4_RATIO``), whatever the shipped default is,
# so two recipes can be measured side by side; "ov-int4" is the shipped recipe.
INT4_RATIOS = {"ov-int4-r1.0": 1.0, "ov-int4-r0.8": 0.8}
# runtime configurations measured per exported variant: (label, backend, mmap, dyn-quant group)
# (label, backend, mmap, dq group, release mapped weights)
CONFIGS = {
    "ort-int8": [("ORT int8 (dynamic)", "onnxruntime", True, 0, False)],
    "ort-int4": [("ORT int4 (MatMulNBits)", "onnxruntime", True, 0, False)],
    "ov-int4": [("OV int4 IR, mmap on, page-out on, dq off", "openvino", True, 0, True),
                ("OV int4 IR, mmap on, page-out off, dq off", "openvino", True, 0, False),
                ("OV int4 IR, mmap on, page-out on, dq 128", "openvino", True, 128, True),
                ("OV int4 IR, mmap off, dq off", "openvino", False, 0, False)],
    "ov-int4-r1.0": [("OV int4 IR ratio 1.0, mmap on, page-out on, dq off", "openvino", True, 0, True)],
    "ov-int4-r0.8": [("OV int4 IR ratio 0.8, mmap on, page-out on, dq off", "openvino", True, 0, True)],
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


# server rows: (label, extra ``encapure serve`` arguments)
SERVER_CONFIGS = [
    ("server, defaults", []),  # `encapure serve --model X`, nothing else: the section's table
    # one lever at a time off the defaults
    ("server, --workers 2", ["--workers", "2"]),  # the worker count before large models got 1
    ("server, --no-malloc-trim", ["--no-malloc-trim"]),  # no idle release
    ("server, --malloc-arena-max 2", ["--malloc-arena-max", "2"]),
    ("server, old defaults", ["--workers", "2", "--no-malloc-trim"]),
]

_STARTUP_PROBE = r"""
import json, sys, time
t_launch = float(sys.argv[3])
stages = {"interpreter start": time.time() - t_launch}
t = time.perf_counter()
from pathlib import Path
import numpy as np
import openvino as ov
from encapure.engine.loading import load_model
from encapure.engine.model import OnnxModel
from encapure.engine.spm_tokenizer import open_tokenizer
from encapure.manifest import Manifest
from encapure.settings import Settings
import encapure.server.app  # what `encapure serve` imports before loading
stages["imports (encapure, openvino, server)"] = time.perf_counter() - t
folder, workers = Path(sys.argv[1]), int(sys.argv[2])
settings = Settings(workers=workers)
m = Manifest.load(folder)
t = time.perf_counter()
tok, kind = open_tokenizer(folder / m.tokenizer_file, m.tokenizer, settings.tokenizer)
stages[f"tokenizer ({kind})"] = time.perf_counter() - t
del tok
core = ov.Core()
core.set_property({"ENABLE_MMAP": True})
t = time.perf_counter()
ir = core.read_model(str(folder / m.model_file))
stages["read_model (mmap)"] = time.perf_counter() - t
t = time.perf_counter()
compiled = core.compile_model(ir, "CPU", {"INFERENCE_NUM_THREADS": settings.resolved_threads() * workers,
                                        "NUM_STREAMS": str(workers), "INFERENCE_PRECISION_HINT": "f32"})
stages["compile_model"] = time.perf_counter() - t
del compiled, ir
t = time.perf_counter()
model = load_model(folder, settings=settings, warmup=False)
stages["load_model without warm-up (tokenizer + read + compile again)"] = time.perf_counter() - t
t = time.perf_counter()
model.warmup()
stages["engine warm-up (1x8, 4x32)"] = time.perf_counter() - t
t = time.perf_counter()
prep = model.prepare_pairs("warm up query", ["a warm up document"] * 4)
model.forward(prep.units)
stages["server warm-up request (4 pairs)"] = time.perf_counter() - t
from encapure.server.state import PRICE_PROBE_LENGTH, PRICE_PROBE_MIN_S, WARMUP_MAX_LENGTH
from encapure.engine.types import Unit
length = min(model.max_length, WARMUP_MAX_LENGTH)
n = max(1, min(settings.max_batch_size, settings.max_batch_tokens // length))
t = time.perf_counter()
model.forward([Unit(ids=np.full(PRICE_PROBE_LENGTH, m.pad_token_id, dtype=np.int64))])
short = time.perf_counter() - t
stages[f"largest-batch pricing, short (1x{PRICE_PROBE_LENGTH})"] = short
one = short * length / PRICE_PROBE_LENGTH
priced = one * n if one >= PRICE_PROBE_MIN_S else 0.0
if priced <= settings.warmup_budget_s:  # what the server did before the short probe, always
    t = time.perf_counter()
    model.forward([Unit(ids=np.full(length, m.pad_token_id, dtype=np.int64))])
    one = time.perf_counter() - t
    stages[f"largest-batch pricing, full (1x{length})"] = one
    priced = one * n
else:  # what the server paid before the short probe (measured here only, for the breakdown)
    t = time.perf_counter()
    model.forward([Unit(ids=np.full(length, m.pad_token_id, dtype=np.int64))])
    stages[f"(saved now) full pricing (1x{length})"] = time.perf_counter() - t
print(json.dumps({"stages_s": {k: round(v, 2) for k, v in stages.items()},
                  "largest_batch": f"{n}x{length}", "priced_s": round(priced, 1),
                  "budget_s": settings.warmup_budget_s, "largest_batch_runs": priced <= settings.warmup_budget_s}))
"""


def startup_probe(folder: Path, workers: int) -> dict[str, Any]:
    return _run_probe([_STARTUP_PROBE, str(folder), str(workers), repr(time.time())])


def _proc_rss(pid: int) -> dict[str, float]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "RssAnon", "RssFile")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) / 1024
    return out


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def cut_pairs(folder: Path, pairs: list[tuple[str, str]], tokens: int = 64) -> list[tuple[str, str]]:
    """Requests of 8 pairs, one query each (the server probe sends ``pairs[8 * i:][:8]`` as one
    /rerank request, with the first pair's query): each group of 8 takes its first pair's query and
    every document is cut (at a token's end offset) so query + document is exactly ``tokens`` tokens
    with the model's ``tokenizer.json``. The server keeps its own max length (512) and still sees
    8 x 64-token requests. A document that cannot come out at exactly ``tokens`` is dropped; a group
    left with fewer than 8 is dropped."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.no_truncation()
    out: list[tuple[str, str]] = []
    for g in range(0, len(pairs) - 7, 8):
        q = pairs[g][0]
        group = []
        for _, d in pairs[g:g + 8]:
            nq = len(tok.encode(q, d).ids) - len(tok.encode("", d).ids)  # query tokens (specials cancel)
            doc = tok.encode(d, add_special_tokens=False)
            k = tokens - nq - tok.num_special_tokens_to_add(True)
            if k <= 0 or k > len(doc.ids):
                continue
            cut = d[:doc.offsets[k - 1][1]]
            if len(tok.encode(q, cut).ids) == tokens:
                group.append((q, cut))
        if len(group) == 8:
            out += group
    return out


IDLE_S = 1.0  # "after an idle second": the server releases memory once idle for 0.25 s (--malloc-trim)


def model_size_mb(folder: Path) -> float:
    """The model's files (graph and weights; not the tokenizer), MB."""
    return round(sum(p.stat().st_size for p in folder.iterdir()
                     if p.name.startswith(("model.onnx", "model.xml", "model.bin"))) / 1e6, 1)


def _probe_records(settings_cache: Path) -> dict[str, str]:
    """--backend auto's recorded choices (model file -> backend) in the cache the server uses."""
    out = {}
    for rec in (settings_cache / "backend-probes").glob("*.json"):
        try:
            data = json.loads(rec.read_text())
            out[str(data["model"])] = str(data["chosen"])
        except (OSError, ValueError, KeyError):
            continue
    return out


def served_backend(folder: Path, before: dict[str, str], after: dict[str, str]) -> str:
    """Which runtime the server ran the model on: an IR only runs on OpenVINO; an ONNX file on what the
    auto probe recorded (and whether this start ran the probe, which then counts in its start-up)."""
    if (folder / "model.xml").is_file():
        return "openvino"
    onnx = str((folder / "model.onnx").resolve())
    chosen = after.get(onnx) or after.get(str(folder / "model.onnx"))
    if chosen is None:
        return "?"
    return chosen + ("" if onnx in before or str(folder / "model.onnx") in before else " (probed at this start)")


def request_tokens(log_path: Path) -> list[int]:
    """Tokens per /rerank request as the server counted them (its access log): the pairs are cut to 64
    tokens by ``tokenizer.json``, the server may tokenize with SentencePiece, which can differ by a few."""
    return [int(m.group(1)) for m in re.finditer(r"route=/rerank status=200 .*?tokens=(\d+)", log_path.read_text())]


def server_probe(folder: Path, extra: list[str], runs: int, pairs: list[tuple[str, str]],
                 log_dir: Path) -> dict[str, Any]:
    """``encapure serve --model folder`` (plus ``extra``) in a fresh process: seconds from launch to
    /ready 200; the process's RSS at ready and ``IDLE_S`` later, after ``runs`` sequential /rerank
    requests of 8 pairs (c=1) as the last response arrives and ``IDLE_S`` later; p50."""
    import socket

    import httpx

    from encapure.settings import Settings

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    log_path = log_dir / f"server-{folder.name}-{port}.log"  # not beside the model: its folder may be read-only
    cache = Path(Settings().cache_dir).expanduser()
    records = _probe_records(cache)
    cmd = [sys.executable, "-m", "encapure", "serve", "--model", str(folder), "--port", str(port), *extra]
    t0 = time.perf_counter()
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(timeout=300) as client:
            while True:
                if proc.poll() is not None:
                    return {"error": f"server exited {proc.returncode}: {log_path.read_text()[-300:]}"}
                try:
                    if client.get(f"{url}/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.perf_counter() - t0 > 900:
                    return {"error": "not ready after 900 s"}
                time.sleep(0.05)
            ready_s = time.perf_counter() - t0
            at_ready = _proc_rss(proc.pid)
            time.sleep(IDLE_S)
            ready_idle = _proc_rss(proc.pid)
            kids = _children(proc.pid)
            lat = []
            for i in range(runs):
                batch = pairs[(i * 8) % len(pairs):][:8]
                t = time.perf_counter()
                r = client.post(f"{url}/rerank", json={"query": batch[0][0], "documents": [d for _, d in batch]})
                lat.append(time.perf_counter() - t)
                if r.status_code != 200:
                    return {"error": f"request {i + 1}: HTTP {r.status_code} {r.text[:200]}"}
            after = _proc_rss(proc.pid)
            time.sleep(IDLE_S)
            after_idle = _proc_rss(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
    lat.sort()
    skipped = [ln for ln in log_path.read_text().splitlines() if "largest-batch warm-up skipped" in ln]
    workers = [ln for ln in log_path.read_text().splitlines() if "inference worker(s)" in ln]
    tokens = request_tokens(log_path)

    def mb(rss: dict[str, float], prefix: str) -> dict[str, int]:
        return {f"rss_{prefix}_mb": round(rss["VmRSS"]), f"anon_{prefix}_mb": round(rss["RssAnon"]),
                f"file_{prefix}_mb": round(rss["RssFile"])}

    return {"size_mb": model_size_mb(folder), "backend": served_backend(folder, records, _probe_records(cache)),
            "startup_s": round(ready_s, 2), **mb(at_ready, "ready"), **mb(ready_idle, "ready_idle"),
            **mb(after, "after"), **mb(after_idle, "after_idle"), "requests": runs, "idle_s": IDLE_S,
            "child_processes": len(kids), "p50_ms": round(1000 * lat[len(lat) // 2], 1),
            "min_ms": round(1000 * lat[0], 1), "largest_batch_warmup": "skipped" if skipped else "ran",
            "workers_log": workers[-1].strip()[-160:] if workers else "",
            **({"tokens_per_request": [min(tokens), max(tokens)]} if tokens else {}), "args": " ".join(extra) or "(defaults)"}


def server_table(results: dict[str, Any]) -> str:
    lines = ["| variant | backend | model files | startup (to /ready) | RSS at ready (anon/file) | + 1 s idle | "
             "N | after N requests (anon/file) | + 1 s idle (anon/file) | c=1 p50 (min) | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for variant, res in results.get("variants", {}).items():
        for label, p in res.get("server", {}).items():
            name = variant if label == SERVER_CONFIGS[0][0] else f"{variant}: {label}"
            if "error" in p:
                lines.append(f"| {name} | error: {p['error']} | | | | | | | | | |")
                continue
            loads = [x for x in (p.get("loadavgs") or [p.get("loadavg")]) if x is not None]
            lines.append(
                f"| {name} | {p['backend']} | {p['size_mb']:.0f} MB | {p['startup_s']:.1f} s | "
                f"{p['rss_ready_mb']} MB ({p['anon_ready_mb']}/{p['file_ready_mb']}) | {p['rss_ready_idle_mb']} MB | "
                f"{p['requests']} | {p['rss_after_mb']} MB ({p['anon_after_mb']}/{p['file_after_mb']}) | "
                f"{p['rss_after_idle_mb']} MB ({p['anon_after_idle_mb']}/{p['file_after_idle_mb']}) | "
                f"{p['p50_ms']:.0f} ({p['min_ms']:.0f}) ms | {', '.join(str(x) for x in loads)} |")
    return "\n".join(lines)


def _best(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """Rounds merged: the best (lowest) time of each row, the highest RSS (the bar is a ceiling),
    and every round's load average."""
    if old is None or "error" in old or "error" in new:
        return {**new, "loadavgs": [new.get("loadavg")]}
    out = dict(old)
    for k, v in new.items():
        if (k.endswith("_s") and isinstance(v, (int, float))) or k in ("p50_ms", "min_ms"):
            out[k] = min(old.get(k, v), v)
        elif k.endswith("_mb") and isinstance(v, (int, float)):
            out[k] = max(old.get(k, v), v)
        elif k == "stages_s":
            out[k] = {s: min(old[k].get(s, t), t) for s, t in v.items()}
    out["loadavgs"] = [*old.get("loadavgs", []), new.get("loadavg")]
    return out


def cpu_isa() -> str:
    from encapure.engine.backends.auto import cpu_signature

    return cpu_signature()


def export(variant: str, out: Path, parity: bool = True) -> dict[str, Any]:
    import torch
    from transformers import AutoConfig, AutoTokenizer, XLMRobertaForSequenceClassification

    from encapure.export import export_model, openvino_ir

    fmt, precision = VARIANTS[variant]
    shipped_ratio = openvino_ir.INT4_RATIO
    openvino_ir.INT4_RATIO = INT4_RATIOS.get(variant, shipped_ratio)
    config = AutoConfig.from_pretrained(str(BGE_ARCH))
    tok = AutoTokenizer.from_pretrained(str(BGE_ARCH))
    torch.manual_seed(0)
    model = XLMRobertaForSequenceClassification(config).eval()
    t = time.perf_counter()
    res = export_model(model, out, precision=precision, tokenizer=tok, format=fmt, progress=True,
                       check_parity=parity)
    export_s = time.perf_counter() - t
    openvino_ir.INT4_RATIO = shipped_ratio  # the next variant in this process gets the shipped recipe
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
    """The BENCHMARKS.md section (benchmarks/report.py includes the file this writes): one table per kind
    of row measured, the server's defaults first."""
    c = results["conditions"]
    variants = results.get("variants", {})
    exports = []
    for v, res in variants.items():
        ex = res.get("export") or {}
        if not ex:
            continue
        steps = ex.get("steps_s") or {}
        parity = ex.get("parity") or {}
        work = sum(t for k, t in steps.items() if k not in ("total", "Verifying against PyTorch"))
        pline = (f", parity vs PyTorch max |Δ| {parity['max_abs_diff']:.3f}, cosine {parity['cosine']:.3f}"
                 if parity.get("max_abs_diff") is not None else "")
        exports.append(f"- `{v}`: {ex.get('size_mb', '?')} MB; export {work:.0f} s without the PyTorch parity step{pline}.")
    has = {kind: any(r.get(kind) for r in variants.values()) for kind in ("configs", "engine", "server", "startup")}
    load = f"load average {c['loadavg_start'][0]:.1f} at start"
    # Our own server and client bring the load to ~2 on 2 cores; more at the start means other work.
    shared = "**shared CPU**" if c["loadavg_start"][0] >= 1.5 else "nothing else running at the start"
    if c.get("loadavg_end"):
        load += f", {c['loadavg_end'][0]:.1f} at the end"
    out = [
        "## bge-reranker-v2-m3 memory (architecture, random weights): `encapure serve` defaults, "
        "int8/int4 ONNX vs int4 OpenVINO IR\n",
        f"`python scripts/measure_bge_memory.py` on {c['cpu']}, {shared} ({load}; the `load` column: "
        "1-minute load average after each row). RSS does not depend on the load; start-up and latency do: "
        "compare them within the table only.\n",
    ]
    counts = [p["tokens_per_request"] for r in variants.values() for p in r.get("server", {}).values()
              if "tokens_per_request" in p]
    tok = (min(c[0] for c in counts), max(c[1] for c in counts)) if counts else None
    workers = {m.group(1) for r in variants.values() for p in r.get("server", {}).values()
               if (m := re.search(r"(\d+) inference worker", p.get("workers_log", "")))}
    if has["server"]:
        out += [
            "`encapure serve --model <folder>` and nothing else (a fresh process per row: `--backend auto`, "
            "the worker count sized by the model"
            + (f" (the server logged {', '.join(sorted(workers))} inference worker(s))" if workers else "")
            + ", idle memory release on). Model files: graph and weights, "
            "not the tokenizer. Backend: an IR runs on OpenVINO; for ONNX, what the auto probe recorded for "
            "the file. Startup: launch to the first /ready 200. RSS of the server process (VmRSS; anonymous/"
            f"file-backed), read at /ready, {IDLE_S:.0f} s later, after N sequential /rerank requests of 8 "
            "WikiQA-test-gold pairs cut to exactly 64 tokens by `tokenizer.json` (read as the last response "
            "arrives; " + (f"{tok[0]}" if tok and tok[0] == tok[1] else f"{tok[0]}-{tok[1]}" if tok else "?")
            + " tokens per request as the server counted them) and "
            f"{IDLE_S:.0f} s later (the server releases memory once idle for 0.25 s). p50 over the N requests, "
            "c=1.\n",
            server_table(results), ""]
    out += [*exports, *([""] if exports else [])]
    if has["configs"]:
        out += [
            "One fresh process per row, 1 stream x 2 threads, the session alone (no tokenizer, no server): RSS "
            f"after load, after {runs} requests of 8 x 64 random token ids (new ids each request), after 9 more "
            "of other shapes; then the `tokenizers` XLM-R tokenizer (`tokenizer.json`) loaded into the same "
            "process. Startup = session creation + tokenizer load (the first request also pays the plugin's "
            "weight repacking: `first run`). mmap = `--openvino-mmap`, dq = "
            "`--openvino-dynamic-quantization-group-size`. Batch invariance = max |Δ logit| between 8 rows of "
            "different lengths scored alone and in one padded batch.\n", table(results), ""]
    if has["engine"]:
        out += [
            "Through the engine (`load_model` with the tokenizer the export recorded and its warm-up, 1 worker "
            "x 2 threads, max length 64; N requests of 8 WikiQA-test-gold pairs, each exactly 64 tokens; a fresh "
            "process per row, RSS at ready and after the requests; scores of 16 fixed pairs at ready vs after "
            "the requests, and vs the first row):\n", engine_table(results), ""]
    out += [f"Startup stages, {v}, {label} (load average {p.get('loadavgs') or p.get('loadavg')}): "
            + ", ".join(f"{k} {t} s" for k, t in p.get("stages_s", {}).items())
            + f"; largest batch {p.get('largest_batch')} priced {p.get('priced_s')} s vs budget {p.get('budget_s')} s.\n"
            for v, res in variants.items() for label, p in res.get("startup", {}).items() if "error" not in p]
    out.append("Earlier measurements of this model (the session alone, the engine, mmap and page-out of the IR's "
               "weights, OpenVINO's model cache, the int4 recipe's ratio, start-up stages) were made on older "
               "defaults and are in this file's history: `git log -p benchmarks/results/bge-reranker-v2-m3-memory.md`.")
    return "\n".join(out).rstrip()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="ort-int8,ort-int4,ov-int4")
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--out", type=Path, default=ROOT / ".work" / "bge-memory")
    ap.add_argument("--probe-only", action="store_true")
    ap.add_argument("--skip-export", default="", help="variants already exported (their folders are reused)")
    ap.add_argument("--only", choices=["all", "session", "engine", "server", "startup"], default="server",
                    help="session: the session-only rows; engine: the engine rows (OpenVINO IR variants); "
                    "server (default): `encapure serve` rows; startup: where the seconds to ready go (IR variants)")
    ap.add_argument("--folder", action="append", default=[], metavar="VARIANT=PATH",
                    help="measure the export in PATH as VARIANT instead of exporting to <out>/VARIANT (not "
                    "written to; repeatable)")
    ap.add_argument("--md", type=Path, default=None,
                    help=f"write the BENCHMARKS.md section here (e.g. {MD.relative_to(ROOT)}, which holds hand-written "
                    "notes it would replace); default <out>/section.md")
    ap.add_argument("--server-rows", default="0",
                    help="indices into SERVER_CONFIGS to measure (default 0: the defaults; 'all': every row)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="engine/server/startup rows: alternate the variants this many rounds (A, B, A, B...), "
                    "keeping each row's best startup and p50 and its last RSS")
    ap.add_argument("--engine-rows", default="", help="indices into ENGINE_CONFIGS to measure (default: all)")
    ap.add_argument("--render", action="store_true",
                    help="measure nothing: write the section (--md) from <out>/results.json as it stands")
    ap.add_argument("--no-parity", action="store_true",
                    help="skip the PyTorch parity check (10 minutes per variant on a busy 2-core machine)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    res_path = args.out / "results.json"
    results: dict[str, Any] = json.loads(res_path.read_text()) if res_path.exists() else {}
    md = args.md or args.out / "section.md"  # the benchmark page has hand-written notes: opt in
    if args.render:
        md.write_text(section(results, args.runs) + "\n")
        print(f"wrote {md}")
        return
    results["conditions"] = {"cpu": cpu_isa(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
                             "loadavg_start": os.getloadavg(), "threads": 2}
    variants = results.setdefault("variants", {})
    names = args.variants.split(",")
    given = dict(f.split("=", 1) for f in args.folder)
    folders = {v: Path(given[v]) if v in given else args.out / v for v in names}
    if not args.probe_only:  # export all first: the probes then run without an export beside them
        for v in names:
            if v in args.skip_export.split(",") or v in given:
                continue
            variants.setdefault(v, {})["export"] = export(v, args.out / v, parity=not args.no_parity)
            print(f"{v}: export {json.dumps(variants[v]['export'])}", flush=True)
            res_path.write_text(json.dumps(results, indent=2) + "\n")
    for v in names if args.only in ("all", "session") else []:
        for label, backend, mmap, dq, release in CONFIGS[v]:
            p = probe(folders[v], backend, mmap, dq, args.runs, release)
            variants.setdefault(v, {}).setdefault("configs", {})[label] = p
            print(f"{label}: {json.dumps(p)}", flush=True)
            res_path.write_text(json.dumps(results, indent=2) + "\n")
    pairs = long_pairs()
    ir = [v for v in names if VARIANTS[v][0] == "openvino"]
    jobs: list[tuple[str, str, list[str], Any]] = []  # (kind, label, variants, measure(folder) -> row)
    if args.only in ("all", "engine"):
        rows = [int(i) for i in args.engine_rows.split(",")] if args.engine_rows else range(len(ENGINE_CONFIGS))
        for label, mmap, release in (ENGINE_CONFIGS[i] for i in rows):
            jobs.append(("engine", label, ir, lambda f, m=mmap, r=release: engine_probe(f, m, r, args.runs, pairs)))
    if args.only in ("all", "server"):
        rows = (range(len(SERVER_CONFIGS)) if args.server_rows == "all"
                else [int(i) for i in args.server_rows.split(",")])
        served: dict[Path, list[tuple[str, str]]] = {}
        for label, extra in (SERVER_CONFIGS[i] for i in rows):
            def run_server(f: Path, x: list[str] = extra) -> dict[str, Any]:
                if f not in served:
                    served[f] = cut_pairs(f, pairs)
                return server_probe(f, x, args.runs, served[f], args.out)
            jobs.append(("server", label, names, run_server))
    if args.only == "startup":
        for w in (2, 1):
            jobs.append(("startup", f"workers {w}", ir, lambda f, w=w: startup_probe(f, w)))
    # alternated: round r measures every job on every variant before round r + 1 starts
    for _ in range(args.rounds):
        for kind, label, of, measure in jobs:
            for v in of:
                p = measure(folders[v])
                p["loadavg"] = round(os.getloadavg()[0], 1)
                rows_of = variants.setdefault(v, {}).setdefault(kind, {})
                rows_of[label] = _best(rows_of.get(label) if args.rounds > 1 else None, p)
                print(f"{v} {label}: {json.dumps({k: x for k, x in p.items() if k != 'scores'})}", flush=True)
                res_path.write_text(json.dumps(results, indent=2) + "\n")
    results["conditions"]["loadavg_end"] = os.getloadavg()
    res_path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{results['conditions']['cpu']}, 2 threads, {args.runs} runs, load {os.getloadavg()[0]:.1f}\n")
    for kind, render in (("configs", table), ("engine", engine_table), ("server", server_table)):
        if any(r.get(kind) for r in variants.values()):
            print(render(results))
    for v in ir:
        for label, p in variants.get(v, {}).get("startup", {}).items():
            print(f"\n{v} startup, {label} (load {p.get('loadavg')}): {json.dumps(p)}")
    md.write_text(section(results, args.runs) + "\n")
    print(f"wrote {md}")


if __name__ == "__main__":
    main()

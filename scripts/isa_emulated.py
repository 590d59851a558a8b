#!/usr/bin/env python
"""Score WikiQA-test-gold natively and on an emulated older CPU (QEMU user mode), compare MAP and scores.

Development machines change between AMD EPYC with AVX2 only and CPUs with AVX-512 VNNI, and the int8
kernels of ONNX Runtime (MLAS) and OpenVINO dispatch on CPUID. ``qemu-x86_64 -cpu EPYC-Rome`` (Debian
package ``qemu-user``) runs the same Python with a CPUID that has AVX2 but no AVX-512 and no VNNI, so
the AVX2 kernels run (emulated bit-exactly, ~150x slower) on whatever CPU this is::

    python scripts/isa_emulated.py MODEL_DIR [--cpu EPYC-Rome] [--backend onnxruntime] [--queries N]
        [--per-query] [--save DIR]
    python scripts/isa_emulated.py MODEL_DIR --probe    # what --backend auto picks on that ISA

Prints the ISA each run saw (with ``--backend openvino`` also the CPU plugin's capabilities and device
name, since OpenVINO dispatches on CPUID itself), MAP of both runs against the fp32 reference (if
``--fp32 DIR`` is given), and how many pairs scored differently. Corpus-batched by default (all pairs in
one call, the engine's own batching); ``--per-query`` scores each query's candidates as one call, as a
search service reranks. 2 threads. ``--save DIR`` keeps the raw scores (``native.npy``, ``emulated.npy``,
``fp32.npy``) to compare runs afterwards. All 2,351 pairs took ~23 min emulated on a loaded 2-core
machine (ONNX Runtime); ``--queries 30`` is ~2 min.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ENCAPURE_SHARED", ROOT.parent / "shared"))
WIKIQA = SHARED / "data" / "wikiqa" / "WikiQA-test-gold.tsv"

CHILD = r"""
import sys
import numpy as np
from numpy._core._multiarray_umath import __cpu_features__ as f
from encapure.engine import Reranker
from encapure.evaluation import load_dataset
from encapure.settings import Settings
model, backend, n, out, per_query = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[6] == "1"
print("ISA seen: AVX2", f.get("AVX2"), "AVX512F", f.get("AVX512F"), "AVX512_VNNI", f.get("AVX512VNNI"), flush=True)
if backend == "openvino":
    import openvino as ov
    core = ov.Core()
    print("OpenVINO CPU:", core.get_property("CPU", "FULL_DEVICE_NAME"),
          core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"), flush=True)
rr = Reranker.from_pretrained(model, settings=Settings(workers=1, threads_per_worker=2, backend=backend))
groups = load_dataset(sys.argv[5])[:n]
if per_query:
    s = [x for g in groups for x in rr.score([(g.query, d) for d in g.documents], raw_scores=True)]
else:
    s = rr.score([(g.query, d) for g in groups for d in g.documents], raw_scores=True)
np.save(out, np.asarray(s))
"""

# ``--probe``: what ``--backend auto`` decides on this ISA: each backend's invariance (alone vs batched)
# and agreement with ONNX Runtime on the probe batch, then the full probe (its timings mean nothing
# under emulation; its verdicts do). Default settings; the probe record goes to a temporary cache.
PROBE = r"""
import json, sys
from dataclasses import asdict
from pathlib import Path
from encapure.engine.backends import BACKENDS, _open
from encapure.engine.backends import auto
from encapure.settings import Settings
path, settings = Path(sys.argv[1]) / "model.onnx", Settings()
print("cpu_signature (from /proc/cpuinfo, the host's under qemu-user):", auto.cpu_signature())
reference = None
for name in BACKENDS:
    session = _open(name, path, settings)
    rows, worst = auto._measure(session, auto._probe_feed(session))
    agree = max(float(abs(a - b).max()) for a, b in zip(rows, reference)) if reference else 0.0
    reference = reference or rows
    print(f"{name:12s} max |alone - batched| {worst:.3g}, max |d| vs onnxruntime {agree:.3g}", flush=True)
print(json.dumps(asdict(auto.probe(path, settings, _open, list(BACKENDS))), indent=1))
"""


def probe(model: str, wrapper: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "ENCAPURE_CACHE": tmp}
        subprocess.run([*wrapper, sys.executable, "-c", PROBE, model], check=True, env=env)


def scores(model: str, backend: str, n: int, wrapper: list[str], per_query: bool = False,
           save: Path | None = None) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "s.npy"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        t = time.monotonic()
        subprocess.run([*wrapper, sys.executable, "-c", CHILD, model, backend, str(n), str(out), str(WIKIQA),
                        "1" if per_query else "0"], check=True, env=env)
        print(f"  scored in {time.monotonic() - t:.0f} s", flush=True)
        if save is not None:
            save.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out, save)
        return np.load(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--fp32", help="an fp32 export of the same model: MAP reference")
    ap.add_argument("--cpu", default="EPYC-Rome", help="QEMU CPU model to emulate (qemu-x86_64 -cpu help)")
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--queries", type=int, default=243)
    ap.add_argument("--per-query", action="store_true", help="one call per query (default: one for all pairs)")
    ap.add_argument("--save", type=Path, help="folder to keep the raw scores in (.npy)")
    ap.add_argument("--probe", action="store_true", help="run --backend auto's probe instead of scoring WikiQA")
    a = ap.parse_args()
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        raise SystemExit("needs qemu-x86_64 (Debian: apt-get install qemu-user)")
    if a.probe:
        for name, wrapper in (("native", []), (f"emulated {a.cpu}", [qemu, "-cpu", a.cpu])):
            print(f"--- {name}", flush=True)
            probe(a.model, wrapper)
        return
    from encapure.evaluation import load_dataset
    from encapure.evaluation.ranking import evaluate_flat

    labels = [g.labels for g in load_dataset(WIKIQA)[: a.queries]]
    def keep(name: str) -> Path | None:
        return a.save / f"{name}.npy" if a.save else None

    native = scores(a.model, a.backend, a.queries, [], a.per_query, keep("native"))
    emulated = scores(a.model, a.backend, a.queries, [qemu, "-cpu", a.cpu], a.per_query, keep("emulated"))
    fp32 = scores(a.fp32, a.backend, a.queries, [], a.per_query, keep("fp32")) if a.fp32 else None
    ref = evaluate_flat(labels, fp32).map if fp32 is not None else None
    print(f"{a.backend}, {'per-query' if a.per_query else 'corpus'} batches, {a.queries} queries, {len(native)} pairs")
    for name, s in (("native", native), (f"emulated {a.cpu}", emulated)):
        m = evaluate_flat(labels, s).map
        print(f"{name:24s} MAP {m:.4f}" + (f" = {100 * m / ref:.2f}% of fp32 {ref:.4f}" if ref else ""))
    d = np.abs(native - emulated)
    print(f"native vs emulated: {int((d > 0).sum())}/{len(d)} pairs differ, max |d| {d.max():.3g} (raw logits)")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Score WikiQA-test-gold natively and on an emulated older CPU (QEMU user mode), compare MAP and scores.

Development machines change between AMD EPYC with AVX2 only and CPUs with AVX-512 VNNI, and the int8
kernels of ONNX Runtime (MLAS) and OpenVINO dispatch on CPUID. ``qemu-x86_64 -cpu EPYC-Rome`` (Debian
package ``qemu-user``) runs the same Python with a CPUID that has AVX2 but no AVX-512 and no VNNI, so
the AVX2 kernels run (emulated bit-exactly, ~150x slower) on whatever CPU this is::

    python scripts/isa_emulated.py MODEL_DIR [--cpu EPYC-Rome] [--backend onnxruntime] [--queries N]

Prints the ISA each run saw, MAP of both runs against the fp32 reference (if ``--fp32 DIR`` is given),
and how many pairs scored differently. Corpus-batched (the engine's own batching), 2 threads.
All 2,351 pairs took ~23 min emulated on a loaded 2-core machine; ``--queries 30`` is ~2 min.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
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
model, backend, n, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
print("ISA seen: AVX2", f.get("AVX2"), "AVX512F", f.get("AVX512F"), "AVX512_VNNI", f.get("AVX512VNNI"), flush=True)
rr = Reranker.from_pretrained(model, settings=Settings(workers=1, threads_per_worker=2, backend=backend))
groups = load_dataset(sys.argv[5])[:n]
np.save(out, np.asarray(rr.score([(g.query, d) for g in groups for d in g.documents], raw_scores=True)))
"""


def scores(model: str, backend: str, n: int, wrapper: list[str]) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "s.npy"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        subprocess.run([*wrapper, sys.executable, "-c", CHILD, model, backend, str(n), str(out), str(WIKIQA)],
                       check=True, env=env)
        return np.load(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--fp32", help="an fp32 export of the same model: MAP reference")
    ap.add_argument("--cpu", default="EPYC-Rome", help="QEMU CPU model to emulate (qemu-x86_64 -cpu help)")
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--queries", type=int, default=243)
    a = ap.parse_args()
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        raise SystemExit("needs qemu-x86_64 (Debian: apt-get install qemu-user)")
    from encapure.evaluation import load_dataset
    from encapure.evaluation.ranking import evaluate_flat

    labels = [g.labels for g in load_dataset(WIKIQA)[: a.queries]]
    native = scores(a.model, a.backend, a.queries, [])
    emulated = scores(a.model, a.backend, a.queries, [qemu, "-cpu", a.cpu])
    ref = evaluate_flat(labels, scores(a.fp32, a.backend, a.queries, [])).map if a.fp32 else None
    for name, s in (("native", native), (f"emulated {a.cpu}", emulated)):
        m = evaluate_flat(labels, s).map
        print(f"{name:24s} MAP {m:.4f}" + (f" = {100 * m / ref:.2f}% of fp32 {ref:.4f}" if ref else ""))
    d = np.abs(native - emulated)
    print(f"native vs emulated: {int((d > 0).sum())}/{len(d)} pairs differ, max |d| {d.max():.3g} (raw logits)")


if __name__ == "__main__":
    main()

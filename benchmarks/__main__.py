"""``python -m benchmarks [--quick] [--out DIR]``: run everything, write BENCHMARKS.md and plots.

Full run: ~20 min on a 2-core machine (first run also exports models and builds peer venvs).
``--quick``: ~3 min, fewer systems and short cells — to check the harness, not to quote numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from benchmarks.models import ROOT


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="~3 minutes: subset of systems, short cells")
    ap.add_argument("--out", type=Path, default=None,
                    help="folder for results.json and the PNG plots (default benchmarks/results, "
                    "benchmarks/results/quick with --quick)")
    ap.add_argument("--md", type=Path, default=None,
                    help="where to write the report (default BENCHMARKS.md at the repo root; with --quick and "
                    "no --md, OUT/BENCHMARKS-quick.md so a quick check never overwrites the full report)")
    ap.add_argument("--only", nargs="*", choices=["rerank", "inproc", "embed", "headline"], default=[],
                    help="run only these phases")
    ap.add_argument("--systems", nargs="*", default=[],
                    help="run only systems whose name contains one of these strings (e.g. encapure naive)")
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    from benchmarks.report import write_report
    from benchmarks.runner import Bench, Plan

    plan = Plan.make(a.quick)
    plan.only = a.only
    plan.systems = a.systems
    # SIGTERM -> SystemExit, so the atexit hook stops every server this run started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    out = (a.out or (ROOT / "benchmarks" / "results" / ("quick" if a.quick else ""))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = Bench(plan, out).run()
    (out / "results.json").write_text(json.dumps(results, indent=1))
    md = a.md or (out / "BENCHMARKS-quick.md" if a.quick else ROOT / "BENCHMARKS.md")
    print(f"report: {write_report(results, out, md)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

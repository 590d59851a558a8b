"""ColBERT (MaxSim) on WikiQA-test-gold next to the cross-encoder fixture and the bi-encoder, and
what MaxSim costs next to encoding. Prints a JSON report (BENCHMARKS.md's ColBERT section).

    python scripts/measure_colbert.py --colbert FP32_DIR [--colbert-int8 DIR] --cross-encoder DIR \
        --bi-encoder DIR --data ../shared/data/wikiqa/WikiQA-test-gold.tsv
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import numpy as np

from encapure.engine import Embedder, Reranker, maxsim
from encapure.evaluation.datasets import load_dataset
from encapure.evaluation.ranking import evaluate_flat
from encapure.evaluation.run import evaluate_reranker
from encapure.settings import Settings


def _isa() -> str:
    flags = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in flags.splitlines() if ln.startswith("Model name")), "?")
    isa = "AVX-512 VNNI" if "avx512_vnni" in flags else ("AVX-512" if "avx512f" in flags else (
        "AVX2" if "avx2" in flags else "other"))
    return f"{model} ({isa})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--colbert", required=True)
    ap.add_argument("--colbert-int8")
    ap.add_argument("--cross-encoder", required=True)
    ap.add_argument("--bi-encoder", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    settings = Settings(workers=1, threads_per_worker=args.threads)
    groups = load_dataset(args.data)
    labels = [g.labels for g in groups]
    report: dict[str, object] = {"cpu": _isa(), "threads": args.threads, "queries": len(groups),
                                 "pairs": sum(len(g.documents) for g in groups)}
    rows = {}
    for name, path in (("colbert fp32", args.colbert), ("colbert int8", args.colbert_int8),
                       ("cross-encoder fp32", args.cross_encoder)):
        if not path:
            continue
        rr = Reranker.from_pretrained(Path(path), settings=settings)
        res = evaluate_reranker(rr, groups)
        rows[name] = {"MAP": round(res.metrics.map, 4), "MRR": round(res.metrics.mrr, 4),
                      "pairs_per_s": round(res.pairs_per_s, 1)}
    emb = Embedder.from_pretrained(Path(args.bi_encoder), settings=settings)
    t0 = time.perf_counter()
    scores = []
    for g in groups:
        q = emb.embed(g.query)
        d = emb.embed(g.documents)
        scores.append(d @ q)
    sec = time.perf_counter() - t0
    m = evaluate_flat(labels, np.concatenate(scores))
    rows["bi-encoder fp32 (cosine)"] = {"MAP": round(m.map, 4), "MRR": round(m.mrr, 4),
                                        "pairs_per_s": round(report["pairs"] / sec, 1)}  # type: ignore[operator]
    report["quality"] = rows

    # Cost: encode every distinct query and document once, then MaxSim over every candidate pair.
    cb = Reranker.from_pretrained(Path(args.colbert), settings=settings)
    queries = [g.query for g in groups]
    docs = sorted({d for g in groups for d in g.documents})
    t0 = time.perf_counter()
    qv = cb.embed_multivector(queries, "query")
    t_q = time.perf_counter() - t0
    t0 = time.perf_counter()
    dv = dict(zip(docs, cb.embed_multivector(docs, "document"), strict=True))
    t_d = time.perf_counter() - t0
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for q, g in zip(qv, groups, strict=True):
            maxsim(q, [dv[d] for d in g.documents])
        best = min(best, time.perf_counter() - t0)
    n_pairs = int(report["pairs"])  # type: ignore[call-overload]
    report["cost"] = {
        "encode_queries_s": round(t_q, 3), "queries": len(queries),
        "encode_documents_s": round(t_d, 3), "documents": len(docs),
        "doc_vectors_mean": round(float(np.mean([v.shape[0] for v in dv.values()])), 1),
        "maxsim_all_pairs_s": round(best, 4),
        "maxsim_us_per_pair": round(best / n_pairs * 1e6, 2),
        "encode_ms_per_document": round(t_d / len(docs) * 1e3, 2),
        "bytes_per_document_fp32": int(np.mean([v.nbytes for v in dv.values()])),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

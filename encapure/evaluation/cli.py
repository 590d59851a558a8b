"""``encapure eval MODEL --dataset PATH``: rerank each query's candidates, print quality and speed."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from encapure.settings import PRECISIONS, DeprecatedFlag, Settings


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "eval",
        help="measure a reranker's MAP/MRR/P@1/NDCG@10 and throughput on a labelled dataset",
        description=(
            "Rerank each query's candidates and print MAP, MRR, P@1, NDCG@10 and pairs/s. "
            "MODEL is an exported folder, a plain Hugging Face folder or a hub id (exported and cached). "
            "DATASET is a BEIR folder, a TSV with a header (WikiQA loads as is) or 3 columns "
            "query/document/label, or a JSONL of {query, document, label}."
        ),
    )
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--dataset", required=True, metavar="PATH")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="precision when MODEL must be exported first (default: ENCAPURE_PRECISION or int8)")
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--threads-per-worker", type=int, default=None, help="ONNX Runtime threads per worker")
    # The flag's old name; `serve` and the settings call it threads-per-worker.
    p.add_argument("--threads", type=int, dest="threads_per_worker", action=DeprecatedFlag,
                   new="--threads-per-worker")
    p.add_argument("--workers", type=int, default=None, help="batches run concurrently")
    p.add_argument("--max-batch-tokens", type=int, default=None)
    p.add_argument("--max-batch-size", type=int, default=None)
    p.add_argument("--split", default="test", help="BEIR qrels split (default test)")
    p.add_argument("--negatives", type=int, default=20, help="BEIR: random corpus negatives per query")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N queries")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from encapure.engine.api import Reranker
    from encapure.evaluation.datasets import load_dataset
    from encapure.evaluation.run import evaluate_reranker

    given: dict[str, Any] = {}
    for field in ("threads_per_worker", "workers", "max_length", "max_batch_tokens", "max_batch_size"):
        value = getattr(args, field)
        if value is not None:
            given[field] = value
    settings = Settings(**given)
    groups = load_dataset(args.dataset, split=args.split, negatives=args.negatives)
    if args.limit is not None:
        groups = groups[: args.limit]
    reranker = Reranker.from_pretrained(args.model, precision=args.precision, settings=settings)
    res = evaluate_reranker(reranker, groups)
    m = res.metrics
    report = {
        "model": reranker.model.name,
        "precision": reranker.model.manifest.precision,
        "dataset": str(args.dataset),
        **m.as_dict(),
        "pairs": res.pairs,
        "tokens": res.tokens,
        "truncated_pairs": res.truncated,
        "seconds": round(res.seconds, 3),
        "pairs_per_s": round(res.pairs_per_s, 1),
        "threads": settings.resolved_threads(),
        "workers": settings.workers,
    }
    if args.json:
        print(json.dumps(report))
        return 0
    out = sys.stdout
    out.write(f"model      {report['model']} ({report['precision']})\n")
    out.write(f"dataset    {args.dataset}: {m.queries} queries evaluated, {m.skipped} without a relevant "
              f"candidate skipped, {res.pairs} pairs ({res.truncated} truncated)\n")
    out.write(f"MAP        {m.map:.4f}\nMRR        {m.mrr:.4f}\nP@1        {m.p_at_1:.4f}\n"
              f"NDCG@10    {m.ndcg_at_10:.4f}\n")
    out.write(f"throughput {res.pairs_per_s:.1f} pairs/s ({res.seconds:.2f} s, {res.tokens} tokens, "
              f"{settings.workers} worker(s) x {settings.resolved_threads()} thread(s))\n")
    return 0

"""PyLate's own answers, computed in a child process (tests/test_colbert.py runs it).

Why a child process: PyLate 1.6.0 needs sentence-transformers 5.3; the project's venv has 6.x, under
which PyLate builds a model but silently drops query expansion (queries come back with their own
length, not 32 vectors). ``make setup`` installs sentence-transformers 5.3 ``--no-deps`` into
``.venv/pylate-st5``; the test puts that folder first on PYTHONPATH for this script only.

Usage: ``python tests/pylate_reference.py JOB.json``; the job says what to do:
- ``{"op": "build", "source": DIR, "out": DIR, "seed": 0}``: ``ColBERT(source)`` (PyLate adds a random
  384->128 Dense, seeded) and ``save(out)``.
- ``{"op": "encode", "model": DIR, "queries": [...], "documents": [...], "out": FILE.npz}``: PyLate's
  query and document vectors, the MaxSim score of every (query, document) pair computed by
  ``pylate.scores.colbert_scores`` one document at a time, and ``pylate.rank.rerank``'s scores.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as f:
        job = json.loads(f.read())
    import numpy as np
    import sentence_transformers
    import torch
    from pylate import models, rank, scores

    assert sentence_transformers.__version__.startswith("5."), sentence_transformers.__version__
    torch.set_num_threads(2)
    if job["op"] == "build":
        torch.manual_seed(int(job.get("seed", 0)))
        model = models.ColBERT(model_name_or_path=job["source"], device="cpu")
        model.save(job["out"])
        return
    model = models.ColBERT(model_name_or_path=job["model"], device="cpu")
    queries, documents = job["queries"], job["documents"]
    q = model.encode(queries, is_query=True, batch_size=8)
    d = model.encode(documents, is_query=False, batch_size=8)
    pair = np.zeros((len(queries), len(documents)), dtype=np.float32)
    for i in range(len(queries)):
        for j in range(len(documents)):
            pair[i, j] = float(scores.colbert_scores(q[i][None], d[j][None])[0, 0])
    ranked = rank.rerank(documents_ids=[list(range(len(documents)))] * len(queries),
                         queries_embeddings=q, documents_embeddings=[d] * len(queries))
    padded = np.zeros_like(pair)
    for i, results in enumerate(ranked):
        for r in results:
            padded[i, int(r["id"])] = r["score"]
    arrays = {f"q{i}": np.asarray(v, dtype=np.float32) for i, v in enumerate(q)}
    arrays |= {f"d{j}": np.asarray(v, dtype=np.float32) for j, v in enumerate(d)}
    np.savez(job["out"], pair=pair, rerank=padded, **arrays)


if __name__ == "__main__":
    main()

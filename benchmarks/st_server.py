"""A minimal FastAPI app around sentence-transformers (PyTorch fp32): the baseline users start from.

``/rerank`` calls ``CrossEncoder.predict`` on the request's pairs; ``/v1/embeddings`` calls
``SentenceTransformer.encode``. Sync handlers (FastAPI's thread pool), no batching across requests.

    python -m benchmarks.st_server --task rerank --model DIR --port 8002 [--threads 2]
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel


class RerankBody(BaseModel):
    query: str
    documents: list[str]
    model: str | None = None


class EmbedBody(BaseModel):
    input: str | list[str]
    model: str | None = None


def build_app(task: str, model: str, threads: int, max_length: int | None) -> FastAPI:
    import torch

    torch.set_num_threads(threads)
    app = FastAPI()

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    if task == "rerank":
        from sentence_transformers import CrossEncoder

        ce = CrossEncoder(model, device="cpu", max_length=max_length)

        @app.post("/rerank")
        def rerank(body: RerankBody) -> dict[str, Any]:
            if not body.documents:
                return {"scores": []}
            scores = ce.predict([(body.query, d) for d in body.documents], batch_size=32)
            return {"scores": [float(s) for s in scores]}

    else:
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(model, device="cpu")

        @app.post("/v1/embeddings")
        def embeddings(body: EmbedBody) -> dict[str, Any]:
            texts = [body.input] if isinstance(body.input, str) else body.input
            vecs = st.encode(texts, batch_size=32, normalize_embeddings=False)
            return {
                "object": "list",
                "data": [{"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(vecs)],
                "model": body.model or "st",
            }

    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--task", choices=["rerank", "embed"], default="rerank")
    p.add_argument("--model", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8002)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    p.add_argument("--max-length", type=int, default=None)
    a = p.parse_args()
    uvicorn.run(build_app(a.task, a.model, a.threads, a.max_length), host=a.host, port=a.port, log_level="warning")


if __name__ == "__main__":
    main()

"""The server people write by hand: FastAPI + ONNX Runtime, one request = one ``session.run``.

No cross-request batching, no length sorting, no admission control: each request is tokenized,
padded to its own longest item and run on its own (FastAPI runs the sync handler in its thread
pool, so concurrent requests call ``session.run`` concurrently). It loads the *same* exported
folder as Encapure (``encapure.json`` + ``model.onnx`` + ``tokenizer.json``) so the comparison is
model-for-model and file-for-file. Only numpy, onnxruntime, tokenizers and fastapi are needed.

    python -m benchmarks.naive_server --model DIR --port 8001 [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel
from tokenizers import Tokenizer


class RerankBody(BaseModel):
    query: str
    documents: list[str]
    model: str | None = None


class EmbedBody(BaseModel):
    input: str | list[str]
    model: str | None = None


def build_app(model_dir: Path, threads: int) -> FastAPI:
    manifest: dict[str, Any] = json.loads((model_dir / "encapure.json").read_text())
    max_len = int(manifest["max_length"])
    tok = Tokenizer.from_file(str(model_dir / manifest.get("tokenizer_file", "tokenizer.json")))
    tok.enable_truncation(max_len)
    tok.enable_padding(pad_id=int(manifest.get("pad_token_id", 0)))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(
        str(model_dir / manifest.get("model_file", "model.onnx")), opts, providers=["CPUExecutionProvider"]
    )
    input_names = [i.name for i in sess.get_inputs()]
    output_name = manifest["output_name"]

    def run(encs: list[Any]) -> np.ndarray:
        feeds = {
            "input_ids": np.array([e.ids for e in encs], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encs], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in encs], dtype=np.int64),
        }
        out = sess.run([output_name], {k: v for k, v in feeds.items() if k in input_names})[0]
        if manifest.get("output_kind") == "token_embeddings":
            mask = feeds["attention_mask"][..., None].astype(np.float32)
            if manifest.get("pooling") == "cls":
                out = out[:, 0]
            else:
                out = (out * mask).sum(1) / np.clip(mask.sum(1), 1e-9, None)
        return np.asarray(out, dtype=np.float32)

    app = FastAPI()

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/rerank")
    def rerank(body: RerankBody) -> dict[str, Any]:
        if not body.documents:
            return {"scores": []}
        encs = tok.encode_batch([(body.query, d) for d in body.documents])
        logits = run(encs)[:, 0]
        scores = 1.0 / (1.0 + np.exp(-logits))
        return {"scores": scores.tolist()}

    @app.post("/v1/embeddings")
    def embeddings(body: EmbedBody) -> dict[str, Any]:
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts:
            return {"object": "list", "data": []}
        vecs = run(tok.encode_batch(texts))
        if manifest.get("normalize"):
            vecs = vecs / np.clip(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12, None)
        return {
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(vecs)],
            "model": body.model or "naive",
        }

    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    a = p.parse_args()
    uvicorn.run(build_app(a.model, a.threads), host=a.host, port=a.port, log_level="warning")


if __name__ == "__main__":
    main()

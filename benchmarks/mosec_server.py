"""mosec + ONNX Runtime: a peer with dynamic (cross-request) batching, configured like its docs show.

Runs inside its own venv (mosec, onnxruntime, tokenizers, numpy). mosec parses its own CLI flags
(``--port``, ``--address``, ``--timeout``), so this script takes its settings from the environment:

    BENCH_MODEL_DIR=DIR BENCH_TASK=rerank BENCH_THREADS=2 BENCH_MAX_BATCH=8 \
        python benchmarks/mosec_server.py --address 127.0.0.1 --port 8003 --timeout 30000

One worker process holds one ORT session with ``BENCH_THREADS`` intra-op threads (same budget as
every other system). mosec groups up to ``BENCH_MAX_BATCH`` requests that arrive within
``BENCH_MAX_WAIT_MS``; the worker runs all their items as one padded batch (no length sorting:
that is what mosec gives you out of the box). Route: ``POST /inference`` with the native rerank
body ``{"query", "documents"}`` or the OpenAI embeddings body ``{"input"}``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from mosec import Server, Worker  # type: ignore[import-not-found]

MODEL_DIR = Path(os.environ.get("BENCH_MODEL_DIR", "."))
TASK = os.environ.get("BENCH_TASK", "rerank")
THREADS = int(os.environ.get("BENCH_THREADS", "2"))
MAX_BATCH = int(os.environ.get("BENCH_MAX_BATCH", "8"))
MAX_WAIT_MS = int(os.environ.get("BENCH_MAX_WAIT_MS", "10"))


class OrtWorker(Worker):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.manifest: dict[str, Any] = json.loads((MODEL_DIR / "encapure.json").read_text())
        self.tok = Tokenizer.from_file(str(MODEL_DIR / self.manifest.get("tokenizer_file", "tokenizer.json")))
        self.tok.enable_truncation(int(self.manifest["max_length"]))
        self.tok.enable_padding(pad_id=int(self.manifest.get("pad_token_id", 0)))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = THREADS
        opts.inter_op_num_threads = 1
        self.sess = ort.InferenceSession(
            str(MODEL_DIR / self.manifest.get("model_file", "model.onnx")), opts, providers=["CPUExecutionProvider"]
        )
        self.input_names = [i.name for i in self.sess.get_inputs()]

    def _run(self, encs: list[Any]) -> np.ndarray:
        feeds = {
            "input_ids": np.array([e.ids for e in encs], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encs], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in encs], dtype=np.int64),
        }
        out = self.sess.run([self.manifest["output_name"]], {k: v for k, v in feeds.items() if k in self.input_names})[0]
        if self.manifest.get("output_kind") == "token_embeddings":
            if self.manifest.get("pooling") == "cls":
                out = out[:, 0]
            else:
                mask = feeds["attention_mask"][..., None].astype(np.float32)
                out = (out * mask).sum(1) / np.clip(mask.sum(1), 1e-9, None)
        return np.asarray(out, dtype=np.float32)

    def forward(self, data: list[dict[str, Any]]) -> list[dict[str, Any]]:
        items: list[Any]
        if TASK == "rerank":
            items = [(r["query"], d) for r in data for d in r["documents"]]
        else:
            items = [t for r in data for t in ([r["input"]] if isinstance(r["input"], str) else r["input"])]
        out: list[dict[str, Any]] = []
        if not items:
            return [{"scores": []} if TASK == "rerank" else {"data": []} for _ in data]
        rows = self._run(self.tok.encode_batch(items))
        pos = 0
        for r in data:
            n = len(r["documents"]) if TASK == "rerank" else (1 if isinstance(r["input"], str) else len(r["input"]))
            chunk = rows[pos : pos + n]
            pos += n
            if TASK == "rerank":
                out.append({"scores": (1.0 / (1.0 + np.exp(-chunk[:, 0]))).tolist()})
            else:
                if self.manifest.get("normalize"):
                    chunk = chunk / np.clip(np.linalg.norm(chunk, axis=1, keepdims=True), 1e-12, None)
                out.append(
                    {"object": "list", "data": [{"index": i, "embedding": v.tolist()} for i, v in enumerate(chunk)]}
                )
        return out


if __name__ == "__main__":
    server = Server()
    server.append_worker(OrtWorker, num=1, max_batch_size=MAX_BATCH, max_wait_time=MAX_WAIT_MS)
    server.run()

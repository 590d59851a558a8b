"""What the int8 experiments (and scripts/measure_export.py) share: fixture paths, WikiQA data and
MAP, bare ONNX Runtime sessions and length-sorted feeds.

The experiments run ONNX Runtime directly, not the engine, on purpose: they compare graphs
(quantization recipes) under one simple, fixed batching and need each graph's raw output. Data
and ranking come from ``encapure.evaluation``, like everywhere else in the project.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from encapure.evaluation import QueryGroup, evaluate_flat, load_dataset

if TYPE_CHECKING:
    from onnxruntime import InferenceSession
    from tokenizers import Encoding, Tokenizer

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ENCAPURE_SHARED", ROOT.parent / "shared"))
WIKIQA = {"test": SHARED / "data" / "wikiqa" / "WikiQA-test-gold.tsv",
          "dev": SHARED / "data" / "wikiqa" / "WikiQA-dev.tsv"}
RERANKER_FIXTURE = SHARED / "models" / "minilm-l6-wikiqa-reranker"
WORK = ROOT / ".work"

Feed = dict[str, np.ndarray]
Batches = list[tuple[np.ndarray, Feed]]  # (row indices into the items, feed of those rows)


def wikiqa(split: str = "test") -> list[QueryGroup]:
    """WikiQA-test-gold (evaluation) or WikiQA-dev (calibration only), grouped by question."""
    path = WIKIQA[split]
    if not path.is_file():
        sys.exit(f"{path} is missing (the ../shared fixtures are expected beside the project root)")
    return load_dataset(path)


def wikiqa_map(groups: list[QueryGroup], scores: Sequence[float] | np.ndarray) -> float:
    """MAP of flat scores (all pairs, question after question), by encapure.evaluation's ranking."""
    return evaluate_flat([g.labels for g in groups], scores).map


def tokenizer(source: Path | Tokenizer, max_length: int, strategy: str = "longest_first") -> Tokenizer:
    """A private, unpadded copy of a model folder's (or a given) tokenizer, truncating at ``max_length``."""
    from tokenizers import Tokenizer

    if isinstance(source, Path):
        t = Tokenizer.from_file(str(source / "tokenizer.json"))
    else:
        t = Tokenizer.from_str(source.to_str())
    t.no_padding()
    t.enable_truncation(max_length, strategy=strategy)
    return t


def feed(encs: Sequence[Encoding], pad_to: int | None = None) -> Feed:
    """BERT-style inputs padded to the longest encoding (or ``pad_to``); the session picks what it takes."""
    w = max(max(len(e.ids) for e in encs), pad_to or 0)
    ids = np.zeros((len(encs), w), np.int64)
    mask = np.zeros_like(ids)
    tt = np.zeros_like(ids)
    for r, e in enumerate(encs):
        n = len(e.ids)
        ids[r, :n], mask[r, :n], tt[r, :n] = e.ids, 1, e.type_ids
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": tt}


def length_batches(encs: Sequence[Encoding], bs: int) -> Batches:
    """Batches of ``bs`` encodings sorted by length (little padding), with their original indices."""
    order = np.argsort([len(e.ids) for e in encs], kind="stable")
    return [(order[i:i + bs], feed([encs[j] for j in order[i:i + bs]])) for i in range(0, len(order), bs)]


def batches(tok: Tokenizer, items: Sequence[Any], max_length: int, bs: int = 32, pairs: bool = False) -> Batches:
    """Tokenize texts (or (query, document) pairs, truncating the document only) into length batches."""
    t = tokenizer(tok, max_length, "only_second" if pairs else "longest_first")
    return length_batches(t.encode_batch(list(items)), bs)


def session(path: Path, threads: int = 2) -> InferenceSession:
    """A CPU session with ``threads`` intra-op threads, one inter-op thread and full graph optimization."""
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.intra_op_num_threads = threads
    o.inter_op_num_threads = 1
    o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    o.log_severity_level = 3
    if threads == 1:
        o.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])


def run_rows(sess: InferenceSession, batches: Batches, n: int, embed: bool) -> np.ndarray:
    """One output row per item in input order: the logit (reranker) or the mean-pooled, L2-normalized
    embedding (embedder)."""
    names = [i.name for i in sess.get_inputs()]
    out: np.ndarray | None = None
    for idx, f in batches:
        y = sess.run(None, {k: f[k] for k in names})[0]
        if embed:
            m = f["attention_mask"][..., None].astype(np.float32)
            e = (y * m).sum(1) / m.sum(1)
            y = e / np.linalg.norm(e, axis=1, keepdims=True)
        else:
            y = y[:, 0]
        if out is None:
            out = np.zeros((n, *y.shape[1:]), np.float32)
        out[idx] = y
    assert out is not None
    return out

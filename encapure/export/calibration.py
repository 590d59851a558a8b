"""Calibration data for static int8: the activation ranges that become constants of the graph.

Static quantization fixes every activation scale at export time, so a row's result no longer
depends on what it is batched with (dynamic int8 computes one scale per batch). The price is that
the ranges must cover what users will send: the set shipped in ``encapure/data/calibration.jsonl``
was written for this project (queries and passages, many topics and languages, short to long,
relevant and hard-negative pairs). ``--calibration FILE`` swaps in a user's own data.

The feeds are cut the way the engine cuts batches (length-sorted, padded-token budget), so the
calibration sees the same shapes and padding the served model sees.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from encapure.engine.batching import plan_batches
from encapure.errors import ExportError

# Engine defaults (Settings.max_batch_tokens / max_batch_size): calibrate on the batches it runs.
_BATCH_TOKENS = 4096
_BATCH_SIZE = 16


def load_items(path: str | Path | None, task: str) -> list[Any]:
    """Pairs (query, passage) for rerankers, single texts otherwise.

    A user file is JSON Lines with ``query`` + ``passage`` (or ``text``) fields, or plain text with
    one text per line (pairs then cannot be formed: each line is scored as a passage for an empty
    query, which still calibrates the document side).
    """
    if path is None:
        raw = resources.files("encapure.data").joinpath("calibration.jsonl").read_text(encoding="utf-8")
        source = "encapure/data/calibration.jsonl"
    else:
        p = Path(path)
        if not p.is_file():
            raise ExportError(f"calibration file {p} not found")
        raw = p.read_text(encoding="utf-8")
        source = str(p)
    rows: list[dict[str, str]] = []
    for n, line in enumerate(raw.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ExportError(f"{source}:{n}: not valid JSON ({e.msg})") from e
            if not isinstance(obj, dict):
                raise ExportError(f"{source}:{n}: expected a JSON object")
            rows.append({k: str(v) for k, v in obj.items() if k in ("query", "passage", "text")})
        else:
            rows.append({"text": line})
    if not rows:
        raise ExportError(f"calibration file {source} holds no texts")
    if task == "rerank":
        return [(r.get("query", ""), r.get("passage", r.get("text", ""))) for r in rows]
    texts: list[str] = []
    for r in rows:
        for k in ("query", "passage", "text"):
            if r.get(k) and r[k] not in texts:
                texts.append(r[k])
    return texts


def feeds(
    rust_tok: Any,
    items: list[Any],
    input_names: list[str],
    max_length: int,
    pad_id: int,
    *,
    batch_size: int = _BATCH_SIZE,
) -> list[dict[str, np.ndarray]]:
    """Tokenized, padded batches in the engine's length-sorted token-budget plan.

    ``batch_size=1`` gives one unpadded text per batch: then no padding position's activation
    (computed, but never read by pooling or the score) widens a range (NNCF's static int8 for
    OpenVINO calibrates that way).
    """
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(rust_tok.to_str())
    tok.no_padding()
    pairs = bool(items) and isinstance(items[0], tuple)
    tok.enable_truncation(max_length, strategy="longest_first")
    encs = tok.encode_batch(items)
    lengths = [len(e.ids) for e in encs]
    out = []
    for batch in plan_batches(lengths, _BATCH_TOKENS, batch_size):
        width = max(lengths[i] for i in batch)
        ids = np.full((len(batch), width), pad_id, dtype=np.int64)
        mask = np.zeros_like(ids)
        types = np.zeros_like(ids)
        for r, i in enumerate(batch):
            n = lengths[i]
            ids[r, :n] = encs[i].ids
            mask[r, :n] = 1
            if pairs:
                types[r, :n] = encs[i].type_ids
        feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        out.append({k: v for k, v in feed.items() if k in input_names})
    return out

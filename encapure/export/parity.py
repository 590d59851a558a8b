"""Does the exported graph compute what the PyTorch model computes?

Runs a fixed set of mixed-length samples (short, long, multilingual, truncated) through both, fed
with the *exported* tokenizer's ids so the check covers the tokenizer file too, and reports max |Δ|,
cosine, Spearman and whether each query's ranking holds. fp32 exports must match within 1e-4.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

FP32_ABS_TOL = 1e-4

_QUERIES = [
    "how do vaccines train the immune system",
    "What is the capital of Australia?",
    "best way to store fresh basil",
    "¿Cuál es el río más largo del mundo?",
    "",
]
_DOCS = [
    "Vaccines expose the immune system to a harmless piece or weakened form of a pathogen so it can "
    "build antibodies and memory cells without causing the disease.",
    "Canberra is the capital city of Australia; Sydney is the largest city.",
    "Keep basil stems in a glass of water at room temperature, loosely covered with a plastic bag.",
    "El río Amazonas y el Nilo compiten por el título del río más largo del mundo.",
    "The stock market closed higher on Tuesday.",
    "ok",
    "Photosynthesis converts light energy into chemical energy stored in glucose. " * 40,
    "東京は日本の首都であり、世界最大の都市圏の一つです。",
]
_TEXTS = [
    "A quick brown fox jumps over the lazy dog.",
    "hello",
    "Transformers process all tokens of a sentence in parallel using self-attention layers. " * 30,
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "机器学习是人工智能的一个分支。",
    "",
    "Why is the sky blue? Rayleigh scattering makes shorter wavelengths scatter more strongly.",
    "emoji 🙂 and symbols ±∑ in text",
    "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen",
]


def sample_inputs(task: str) -> tuple[list[Any], list[int]]:
    """Inputs and a group id per item (rankings are compared within a group = one query)."""
    if task == "rerank":
        items: list[Any] = []
        groups: list[int] = []
        for qi, q in enumerate(_QUERIES):
            for d in _DOCS:
                items.append((q, d))
                groups.append(qi)
        return items, groups
    if task == "classify":
        return list(_TEXTS), [0] * len(_TEXTS)
    return list(_TEXTS), [0] * len(_TEXTS)


def encode(rust_tok: Any, items: list[Any], max_length: int, pad_id: int) -> list[dict[str, np.ndarray]]:
    """Tokenize like the engine does: truncate at max_length (document first), pad per batch of 4."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(rust_tok.to_str())
    pairs = bool(items) and isinstance(items[0], tuple)
    tok.enable_truncation(max_length, strategy="only_second" if pairs else "longest_first")
    encs = []
    for it in items:
        try:
            encs.append(tok.encode(it[0], it[1]) if pairs else tok.encode(it))
        except Exception:  # query alone longer than the limit: fall back to cutting both
            tok.enable_truncation(max_length, strategy="longest_first")
            encs.append(tok.encode(it[0], it[1]))
            tok.enable_truncation(max_length, strategy="only_second")
    batches = []
    for i in range(0, len(encs), 4):
        chunk = encs[i : i + 4]
        width = max(len(e.ids) for e in chunk)
        ids = np.full((len(chunk), width), pad_id, dtype=np.int64)
        mask = np.zeros((len(chunk), width), dtype=np.int64)
        types = np.zeros((len(chunk), width), dtype=np.int64)
        for r, e in enumerate(chunk):
            n = len(e.ids)
            ids[r, :n] = e.ids
            mask[r, :n] = 1
            types[r, :n] = e.type_ids
        batches.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
    return batches


def pool(hidden: np.ndarray, mask: np.ndarray, mode: str, normalize: bool) -> np.ndarray:
    """Reference pooling (the engine has its own; this one only serves the parity check)."""
    m = mask.astype(np.float32)[..., None]
    if mode == "cls":
        out = hidden[:, 0]
    elif mode == "mean":
        out = (hidden * m).sum(1) / np.clip(m.sum(1), 1e-9, None)
    elif mode == "max":
        out = np.where(m > 0, hidden, -1e9).max(1)
    elif mode == "last":
        last = mask.sum(1) - 1
        out = hidden[np.arange(hidden.shape[0]), last]
    else:
        raise ValueError(mode)
    if normalize:
        out = out / np.clip(np.linalg.norm(out, axis=1, keepdims=True), 1e-12, None)
    return out.astype(np.float32)


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x))
    # average ties
    for v in np.unique(x):
        idx = np.where(x == v)[0]
        if len(idx) > 1:
            ranks[idx] = ranks[idx].mean()
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2:
        return 1.0
    ra, rb = _ranks(np.asarray(a, dtype=np.float64)), _ranks(np.asarray(b, dtype=np.float64))
    if ra.std() == 0 or rb.std() == 0:
        return 1.0 if np.array_equal(ra, rb) else 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


def compare(
    task: str,
    ref: list[np.ndarray],
    got: list[np.ndarray],
    masks: list[np.ndarray],
    groups: list[int],
    *,
    pooling: str | None,
    normalize: bool,
) -> dict[str, Any]:
    """Metrics between reference (PyTorch) and exported outputs, batch by batch."""
    report: dict[str, Any] = {"n_items": int(sum(r.shape[0] for r in ref))}
    if task == "embed":
        raw = 0.0
        for r, g, m in zip(ref, got, masks, strict=True):
            sel = m.astype(bool)
            raw = max(raw, float(np.abs(r[sel] - g[sel]).max()))
        e_ref = np.concatenate([pool(r, m, pooling or "cls", normalize) for r, m in zip(ref, masks, strict=True)])
        e_got = np.concatenate([pool(g, m, pooling or "cls", normalize) for g, m in zip(got, masks, strict=True)])
        cos = (e_ref * e_got).sum(1) / (np.linalg.norm(e_ref, axis=1) * np.linalg.norm(e_got, axis=1) + 1e-12)
        report.update(
            max_abs_diff=float(np.abs(e_ref - e_got).max()),
            max_abs_diff_token_embeddings=raw,
            cosine_min=float(cos.min()),
            cosine_mean=float(cos.mean()),
        )
        return report
    s_ref = np.concatenate(ref).astype(np.float64)
    s_got = np.concatenate(got).astype(np.float64)
    diff = float(np.abs(s_ref - s_got).max())
    flat_r, flat_g = s_ref.reshape(len(s_ref), -1), s_got.reshape(len(s_got), -1)
    cos = float((flat_r.ravel() @ flat_g.ravel()) / (np.linalg.norm(flat_r) * np.linalg.norm(flat_g) + 1e-12))
    report.update(max_abs_diff=diff, cosine=cos)
    if task == "rerank":
        a, b = flat_r[:, 0], flat_g[:, 0]
        report["spearman"] = spearman(a, b)
        g = np.asarray(groups)
        held = []
        for q in np.unique(g):
            idx = np.where(g == q)[0]
            held.append(bool(np.array_equal(np.argsort(-a[idx], kind="stable"), np.argsort(-b[idx], kind="stable"))))
        report["ranking_preserved"] = all(held)
        report["queries_ranking_preserved"] = f"{sum(held)}/{len(held)}"
    else:
        report["argmax_agreement"] = float((flat_r.argmax(1) == flat_g.argmax(1)).mean())
    return report


def summary_line(precision: str, report: dict[str, Any]) -> str:
    parts = [f"parity ({precision}, {report.get('n_items', 0)} samples): max |Δ| {report['max_abs_diff']:.2e}"]
    if "cosine_min" in report:
        parts.append(f"cosine min {report['cosine_min']:.5f} mean {report['cosine_mean']:.5f}")
    if "cosine" in report:
        parts.append(f"cosine {report['cosine']:.6f}")
    if "spearman" in report and not math.isnan(report["spearman"]):
        parts.append(f"Spearman {report['spearman']:.4f}")
    if "ranking_preserved" in report:
        parts.append(f"ranking preserved {report['queries_ranking_preserved']} queries")
    if "argmax_agreement" in report:
        parts.append(f"argmax agreement {report['argmax_agreement']:.3f}")
    return ", ".join(parts)

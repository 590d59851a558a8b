"""Does the exported model, as the engine serves it, compute what the PyTorch model computes?

Runs a fixed set of mixed-length samples (short, long, multilingual, truncated, empty) through
both. The exported side is the folder loaded by the engine's own ``load_model`` (manifest,
tokenizer file, session options, pooling and normalization all as served); the PyTorch side is
fed the very token ids the engine produced. Reports max |Δ|, cosine, Spearman and whether each
query's ranking holds. fp32 exports must match within 1e-4.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import numpy as np

from encapure.engine.types import EmbedOutput, Unit
from encapure.errors import ExportError, ManifestError, ModelError
from encapure.settings import Settings

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
    """Trace samples for the ONNX export (before any engine can load it): truncated at max_length
    (document first), padded per batch of 4."""
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


def check(
    torch_model: Any,
    folder: Path,
    task: str,
    *,
    pooling: str | None,
    normalize: bool,
    max_length: int,
    batch_size: int = 4,
) -> dict[str, Any]:
    """Exported ``folder`` (loaded by the engine) vs ``torch_model`` on the fixed samples.

    ``pooling``/``normalize`` are the source model's (its sentence-transformers config), so an
    exported manifest that pools or normalizes differently from the source shows up as a mismatch.
    """
    import torch

    from encapure.engine.loading import load_model
    from encapure.engine.model import l2_normalize, pool

    # The runtime the export is for, whatever ENCAPURE_BACKEND says: ONNX Runtime is the reference for an
    # ONNX export (parity.json is its deviation, which --backend auto reads), OpenVINO for an IR.
    from encapure.export.openvino_ir import IR_FILE

    runtime: Literal["onnxruntime", "openvino"] = "openvino" if (Path(folder) / IR_FILE).is_file() else "onnxruntime"
    settings = Settings(workers=1, max_length=max_length, providers=["CPUExecutionProvider"], backend=runtime,
                        openvino_inference_precision="f32")
    try:
        engine = load_model(folder, settings=settings, name="parity", warmup=False)
    except (ModelError, ManifestError) as e:
        name = "OpenVINO" if runtime == "openvino" else "ONNX Runtime"
        raise ExportError(f"the exported model does not load in {name}: {e.message}") from e
    items, groups = sample_inputs(task)
    prepared = engine.prepare_pair_list(items) if isinstance(items[0], tuple) else engine.prepare_texts(items)
    units = prepared.units
    feed_names = engine.manifest.input_names  # the graph's own inputs (the engine checked them)
    refs, gots, token_diff = [], [], 0.0
    for start in range(0, len(units), batch_size):
        chunk = units[start : start + batch_size]
        feed, mask = _pad(chunk, engine.manifest.pad_token_id)
        got = engine.forward(chunk)  # logits, or token vectors pooled as served
        with torch.no_grad():
            out = torch_model(**{k: torch.from_numpy(feed[k]) for k in feed_names}, return_dict=True)
        if task == "embed":
            hidden = out.last_hidden_state.float().numpy()
            raw = engine.session.run([engine.manifest.output_name], {k: feed[k] for k in feed_names})[0]
            token_diff = max(token_diff, float(np.abs(hidden[mask] - np.asarray(raw, np.float32)[mask]).max()))
            refs.append(pool(hidden, mask, pooling or "cls"))
        else:
            refs.append(out.logits.float().numpy())
        gots.append(got)
    report: dict[str, Any] = {"n_items": len(items)}
    if task == "embed":
        served = engine.finish(prepared, np.concatenate(gots))  # dimensions, normalization as served
        assert isinstance(served, EmbedOutput)
        e_got = served.embeddings
        e_ref = np.concatenate(refs)
        if normalize:
            e_ref = l2_normalize(e_ref)
        cos = (e_ref * e_got).sum(1) / (np.linalg.norm(e_ref, axis=1) * np.linalg.norm(e_got, axis=1) + 1e-12)
        report.update(
            max_abs_diff=float(np.abs(e_ref - e_got).max()),
            max_abs_diff_token_embeddings=token_diff,
            cosine_min=float(cos.min()),
            cosine_mean=float(cos.mean()),
        )
        return report
    report.update(_compare_logits(task, np.concatenate(refs), np.concatenate(gots), groups))
    return report


def _pad(units: list[Unit], pad_id: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The batch the engine's ``forward`` builds from these units, for the PyTorch side."""
    width = max(len(u.ids) for u in units)
    ids = np.full((len(units), width), pad_id, dtype=np.int64)
    types = np.zeros((len(units), width), dtype=np.int64)
    mask = np.zeros((len(units), width), dtype=bool)
    for r, u in enumerate(units):
        n = len(u.ids)
        ids[r, :n] = u.ids
        mask[r, :n] = True
        if u.type_ids is not None:
            types[r, :n] = u.type_ids
    return {"input_ids": ids, "attention_mask": mask.astype(np.int64), "token_type_ids": types}, mask


def _compare_logits(task: str, ref: np.ndarray, got: np.ndarray, groups: list[int]) -> dict[str, Any]:
    s_ref = ref.astype(np.float64)
    s_got = got.astype(np.float64)
    report: dict[str, Any] = {}
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
        parts.append(f"candidate order identical to PyTorch for {report['queries_ranking_preserved']} sample "
                     "queries (near-tied candidates may swap under int8/int4)")
    if "argmax_agreement" in report:
        parts.append(f"argmax agreement {report['argmax_agreement']:.3f}")
    return ", ".join(parts)

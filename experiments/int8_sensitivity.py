"""Greedy per-MatMul sensitivity search for the embedder int8 recipe, judged inside engine batches.

Usage: python experiments/int8_sensitivity.py [--target 0.992] [--rounds 6]

Dynamic int8 computes each activation's scale over the whole batch, so a text's error depends on its
batch-mates; the issue's bar (cosine >= 0.99 to sentence-transformers on *every* text) has to hold in
the engine's real batches, not text by text. Starting from the shipped embed recipe, each round tries
keeping one more quantized MatMul in fp32 and keeps the one that raises the worst text's cosine most,
until the target is met. Prints every candidate, so the result can be turned into a recipe rule.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: experiments/ is a package of ROOT

from experiments._common import ROOT, WORK

sys.path.insert(0, str(ROOT / "tests"))  # the judged texts and model exports are the embedding tests' own
SENSITIVITY_WORK = WORK / "int8-sensitivity"


def mixed_texts(n: int = 300) -> list[str]:
    from test_engine_embed import _mixed_texts

    return _mixed_texts(n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", type=float, default=0.992)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--seeds", type=int, default=2, help="extra shuffled text orders (other batch-mates)")
    ap.add_argument("--try", dest="tries", nargs="*", default=None,
                    help="instead of the greedy search, evaluate these extra fp32 rules (regexes joined by ','; "
                    "'u8:REGEX' gives matching MatMuls u8 weights instead; 'MatMul' = all fp32)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import onnx
    from conftest import _export_folder, embedder_source
    from sentence_transformers import SentenceTransformer

    from encapure.engine import Embedder
    from encapure.export.quantize import _matmul_weight_nodes, int8_recipe, quantize_int8

    fp32_dir = _export_folder(embedder_source(), "fp32", "embedder")
    texts = mixed_texts()
    st = SentenceTransformer(str(embedder_source()), device="cpu")
    ref = np.asarray(st.encode(texts, batch_size=32, normalize_embeddings=True), dtype=np.float32)
    orders = [list(range(len(texts)))]
    for s in range(args.seeds):
        o = list(range(len(texts)))
        random.Random(s).shuffle(o)
        orders.append(o)

    graph = onnx.load(str(fp32_dir / "model.onnx"), load_external_data=False)
    all_nodes = [n for n, _ in _matmul_weight_nodes(graph)]
    base = int8_recipe("embed", "bert")
    SENSITIVITY_WORK.mkdir(parents=True, exist_ok=True)

    def evaluate(extra_fp32: list[str], tag: str, rules: list[str] | None = None) -> tuple[float, float, float]:
        folder = SENSITIVITY_WORK / tag
        if folder.exists():
            shutil.rmtree(folder)
        shutil.copytree(fp32_dir, folder, ignore=shutil.ignore_patterns("model.onnx*"))
        recipe = dict(base)
        rules = rules or []
        recipe["exclude"] = (list(base["exclude"]) + ["^" + re.escape(n) + "$" for n in extra_fp32]
                             + [r for r in rules if not r.startswith("u8:")])
        recipe["u8_nodes"] = list(base["u8_nodes"]) + [r[3:] for r in rules if r.startswith("u8:")]
        quantize_int8(fp32_dir / "model.onnx", folder / "model.onnx", recipe)
        man = json.loads((folder / "encapure.json").read_text())
        man["precision"] = "int8"
        man.pop("sha256", None)
        man["files"] = {}
        (folder / "encapure.json").write_text(json.dumps(man))
        emb = Embedder.from_pretrained(folder)
        worst = 1.0
        means = []
        worst_text = ""
        for o in orders:  # different orders = different batch-mates after length sorting ties
            vec = emb.embed([texts[i] for i in o])
            cos = (vec * ref[o]).sum(axis=1) / np.linalg.norm(vec, axis=1)
            if float(cos.min()) < worst:
                worst = float(cos.min())
                worst_text = texts[o[int(cos.argmin())]]
            means.append(float(cos.mean()))
        t0 = time.perf_counter()
        emb.embed(texts)
        dt = time.perf_counter() - t0
        shutil.rmtree(folder)
        print(f"    worst text: {worst_text[:70]!r}", flush=True)
        return worst, float(np.mean(means)), len(texts) / dt

    if args.tries is not None:
        for t in ["", *args.tries]:
            rules = [r for r in t.split(",") if r]
            w, m, tps = evaluate([], "try", rules)
            print(f"extra fp32 {rules}: worst {w:.4f} mean {m:.5f} {tps:.0f} texts/s", flush=True)
        return
    chosen: list[str] = []
    w, m, tps = evaluate(chosen, "base")
    print(f"base recipe: worst {w:.4f} mean {m:.5f} {tps:.0f} texts/s", flush=True)
    for rnd in range(args.rounds):
        if w >= args.target:
            break
        excluded = set(chosen)
        for rule in base["exclude"]:
            excluded |= {n for n in all_nodes if re.search(rule, n)}
        best: tuple[float, str] | None = None
        for n in all_nodes:
            if n in excluded:
                continue
            cw, cm, ctps = evaluate([*chosen, n], "cand")
            print(f"  round {rnd}: +fp32 {n}: worst {cw:.4f} mean {cm:.5f} {ctps:.0f}/s", flush=True)
            if best is None or cw > best[0]:
                best = (cw, n)
        assert best is not None
        chosen.append(best[1])
        w, m, tps = evaluate(chosen, "base")
        print(f"round {rnd}: keep {best[1]} in fp32 -> worst {w:.4f} mean {m:.5f} {tps:.0f} texts/s", flush=True)
    print(json.dumps({"extra_fp32": chosen, "worst": w, "mean": m}, indent=1))


if __name__ == "__main__":
    main()

"""Ranking metrics (hand-computed), dataset readers and the ``encapure eval`` command."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import WIKIQA_TEST, need

from encapure.cli import main
from encapure.errors import InvalidInputError
from encapure.evaluation.datasets import QueryGroup, load_dataset, mixed_texts, pairs, text_pool
from encapure.evaluation.ranking import (
    average_precision,
    evaluate,
    evaluate_flat,
    ndcg_at,
    precision_at,
    reciprocal_rank,
    split_flat,
)


def test_average_precision_by_hand() -> None:
    # Ranked: rel, non, rel, non -> (1/1 + 2/3) / 2
    assert average_precision([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1]) == pytest.approx((1 + 2 / 3) / 2)
    assert average_precision([0, 0, 1], [0.3, 0.2, 0.1]) == pytest.approx(1 / 3)
    assert average_precision([0, 0], [0.3, 0.2]) == 0.0


def test_ties_keep_input_order() -> None:
    # All scores equal: the stable order is the input order.
    assert reciprocal_rank([0, 1, 0], [0.5, 0.5, 0.5]) == pytest.approx(1 / 2)
    assert precision_at([1, 0], [0.1, 0.1], 1) == 1.0
    assert precision_at([0, 1], [0.1, 0.1], 1) == 0.0


def test_ndcg_by_hand() -> None:
    # Gains 2^rel-1 = [0, 1, 3] ranked as given; ideal [3, 1, 0].
    dcg = 0 / math.log2(2) + 1 / math.log2(3) + 3 / math.log2(4)
    idcg = 3 / math.log2(2) + 1 / math.log2(3)
    assert ndcg_at([0, 1, 2], [3, 2, 1], 10) == pytest.approx(dcg / idcg)
    assert ndcg_at([1, 0], [1, 0], 10) == 1.0
    # Cut at k: a relevant item at rank 3 does not count for k=2.
    assert ndcg_at([0, 0, 1], [3, 2, 1], 2) == 0.0


def test_evaluate_skips_queries_without_positives() -> None:
    m = evaluate([([1, 0], [0.9, 0.1]), ([0, 0], [0.5, 0.4]), ([0, 1], [0.9, 0.1])])
    assert m.queries == 2 and m.skipped == 1
    assert m.map == pytest.approx((1 + 0.5) / 2)
    assert m.mrr == pytest.approx((1 + 0.5) / 2)
    assert m.p_at_1 == pytest.approx(0.5)
    with pytest.raises(ValueError):
        evaluate([([1], [0.1, 0.2])])


def test_flat_scores_are_cut_per_query() -> None:
    labels = [[1, 0], [0, 0, 0], [0, 1]]
    flat = [0.9, 0.1, 0.3, 0.2, 0.1, 0.9, 0.1]
    assert [s.tolist() for s in split_flat(flat, labels)] == [[0.9, 0.1], [0.3, 0.2, 0.1], [0.9, 0.1]]
    m = evaluate_flat(labels, np.asarray(flat))
    assert (m.map, m.queries, m.skipped) == (pytest.approx(0.75), 2, 1)
    assert evaluate_flat([], []).queries == 0
    with pytest.raises(ValueError, match="scores"):
        split_flat(flat[:-1], labels)


def test_wikiqa_loads_directly() -> None:
    groups = load_dataset(need(WIKIQA_TEST))
    assert len(groups) == 243
    assert sum(len(g.documents) for g in groups) == 2351
    assert groups[0].qid == "Q0" and groups[0].query.startswith("HOW AFRICAN AMERICANS")
    assert all(len(g.documents) == len(g.labels) for g in groups)
    assert all(any(label > 0 for label in g.labels) for g in groups)


def test_pairs_and_text_pool_keep_file_order() -> None:
    groups = [QueryGroup("q1", ["a", "b"], [1, 0], "1"), QueryGroup("q2", ["c"], [0], "2"),
              QueryGroup("q1", ["d"], [1], "3")]
    assert pairs(groups) == [("q1", "a"), ("q1", "b"), ("q2", "c"), ("q1", "d")]
    assert text_pool(groups) == (["q1", "q2"], ["a", "b", "c", "d"])


def test_mixed_texts_are_repeatable_and_varied() -> None:
    groups = load_dataset(need(WIKIQA_TEST))
    texts = mixed_texts(groups, 30, np.random.default_rng(0))
    assert texts == mixed_texts(groups, 30, np.random.default_rng(0))
    queries, docs = text_pool(groups)
    assert len(texts) == 30 and set(texts[:10]) <= set(queries) and set(texts[10:20]) <= set(docs)
    assert all(len(t) > max(len(d) for d in docs if t.startswith(d)) for t in texts[20:])  # passages


def test_plain_tsv_jsonl_and_beir(tmp_path: Path) -> None:
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("q1\tdoc a\t1\nq1\tdoc b\t0\nq2\tdoc c\t0\n", encoding="utf-8")
    groups = load_dataset(tsv)
    assert [(g.query, g.documents, g.labels) for g in groups] == [
        ("q1", ["doc a", "doc b"], [1.0, 0.0]), ("q2", ["doc c"], [0.0])]
    headed = tmp_path / "headed.tsv"
    headed.write_text("label\tquery\tpassage\n1\tq\tp1\n0\tq\tp2\n", encoding="utf-8")
    assert load_dataset(headed)[0].documents == ["p1", "p2"]
    jl = tmp_path / "pairs.jsonl"
    jl.write_text('{"query": "q", "document": "d1", "label": 1}\n{"query": "q", "passage": "d2", "label": 0}\n'
                  '{"query": "g", "documents": ["x", "y"], "labels": [0, 1]}\n', encoding="utf-8")
    loaded = load_dataset(jl)
    assert {g.query: g.labels for g in loaded} == {"q": [1.0, 0.0], "g": [0.0, 1.0]}
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "queries.jsonl").write_text('{"_id": "1", "text": "what"}\n{"_id": "2", "text": "unjudged"}\n')
    (beir / "corpus.jsonl").write_text("".join(
        json.dumps({"_id": f"d{i}", "title": "T" if i == 0 else "", "text": f"text {i}"}) + "\n" for i in range(30)))
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n1\td0\t1\n1\td5\t0\n")
    b = load_dataset(beir, negatives=5)
    assert len(b) == 1 and b[0].documents[0] == "T. text 0"
    assert len(b[0].documents) == 7 and b[0].labels[:2] == [1.0, 0.0] and sum(b[0].labels) == 1
    assert load_dataset(beir, negatives=5)[0].documents == b[0].documents  # seeded: repeatable


def test_bad_datasets(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tsv"
    bad.write_text("a\tb\tc\td\n1\t2\t3\t4\n")
    with pytest.raises(InvalidInputError, match="columns"):
        load_dataset(bad)
    bad.write_text("q\td\tnot-a-number\n")
    with pytest.raises(InvalidInputError, match="label"):
        load_dataset(bad)
    with pytest.raises(InvalidInputError):
        load_dataset(tmp_path / "nope.tsv")
    with pytest.raises(InvalidInputError, match="BEIR"):
        load_dataset(tmp_path)


def test_eval_command(reranker_fp32_dir: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc = main(["eval", str(reranker_fp32_dir), "--dataset", str(need(WIKIQA_TEST)), "--limit", "20", "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["queries"] == 20 and report["pairs"] > 20
    for key in ("MAP", "MRR", "P@1", "NDCG@10"):
        assert 0.0 < report[key] <= 1.0
    assert report["pairs_per_s"] > 0
    rc = main(["eval", str(reranker_fp32_dir), "--dataset", str(need(WIKIQA_TEST)), "--limit", "5"])
    out = capsys.readouterr().out
    assert rc == 0 and "MAP" in out and "NDCG@10" in out and "pairs/s" in out
    assert main(["eval", str(tmp_path), "--dataset", str(need(WIKIQA_TEST))]) == 2  # not a model: one-line error
    assert "error" in capsys.readouterr().err


def test_engine_does_not_import_evaluation() -> None:
    """Evaluation sits above the engine: no engine module imports it, not even inside a function."""
    engine = Path(__file__).resolve().parents[1] / "encapure" / "engine"
    offenders = []
    for path in sorted(engine.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}:{node.lineno}" for n in names if n.startswith("encapure.evaluation")]
    assert offenders == []

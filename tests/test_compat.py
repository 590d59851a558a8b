"""encapure.compat: the same calls on sentence-transformers and on ours, compared for values and types.

fp32 exports must match sentence-transformers within 1e-4; the default (calibrated static int8)
exports must keep the engine's bars (reranker MAP within 0.5% of fp32, embedder cosine >= 0.993).
Each integration (langchain, llama-index, haystack) runs unmodified with our class substituted.
"""

from __future__ import annotations

import importlib.util
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import RERANKER_FIXTURE, WIKIQA_TEST, embedder_source, need

from encapure.compat import CrossEncoder, SentenceTransformer
from encapure.errors import InvalidInputError
from encapure.evaluation import evaluate_flat, load_dataset, text_pool
from encapure.evaluation import pairs as pairs_of

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch", reason="comparing with sentence-transformers needs torch")
st = pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed")

ATOL = 1e-4


def _texts(n: int = 120) -> list[str]:
    """Questions, sentences, paragraphs, some past the 256-token limit, and a few odd ones."""
    questions, sentences = text_pool(load_dataset(need(WIKIQA_TEST)))
    rng = random.Random(3)
    texts = rng.sample(questions, n // 3) + rng.sample(sentences, n // 3)
    while len(texts) < n:
        texts.append(" ".join(rng.sample(sentences, rng.randint(3, 20))))
    return [*texts, "a", "ß ü é 北京 😀"]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return _texts()


@pytest.fixture(scope="module")
def pairs() -> list[tuple[str, str]]:
    groups = load_dataset(need(WIKIQA_TEST))[:12]
    out = pairs_of(groups)
    out.append((groups[0].query, " ".join(d for g in groups for d in g.documents)))  # past 256 tokens
    return out


@pytest.fixture(scope="module")
def st_ce() -> Any:
    return st.CrossEncoder(str(need(RERANKER_FIXTURE)), device="cpu")


@pytest.fixture(scope="module")
def ce32(reranker_fp32_dir: Path) -> CrossEncoder:
    return CrossEncoder(str(reranker_fp32_dir), device="cpu")


@pytest.fixture(scope="module")
def st_emb() -> Any:
    return st.SentenceTransformer(str(embedder_source()), device="cpu")


@pytest.fixture(scope="module")
def emb32(embedder_fp32_dir: Path) -> SentenceTransformer:
    return SentenceTransformer(str(embedder_fp32_dir), device="cpu")


def _same(ours: Any, theirs: Any, atol: float = ATOL) -> None:
    """Same type, dtype, shape, and values within ``atol``."""
    assert type(ours) is type(theirs), (type(ours), type(theirs))
    if isinstance(theirs, list):
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs, strict=True):
            _same(a, b, atol)
        return
    if isinstance(theirs, torch.Tensor):
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        np.testing.assert_allclose(ours.numpy(), theirs.numpy(), atol=atol)
        return
    assert np.asarray(ours).dtype == np.asarray(theirs).dtype
    assert np.shape(ours) == np.shape(theirs)
    np.testing.assert_allclose(ours, theirs, atol=atol)


# --- CrossEncoder ------------------------------------------------------------------------------
def test_predict_matches_sentence_transformers(st_ce: Any, ce32: CrossEncoder,
                                               pairs: list[tuple[str, str]]) -> None:
    assert ce32.num_labels == st_ce.num_labels == 1
    assert ce32.max_seq_length == st_ce.max_seq_length == 256 == ce32.max_length
    _same(ce32.predict(pairs), st_ce.predict(pairs))
    _same(ce32.predict(pairs, batch_size=5), st_ce.predict(pairs, batch_size=5))
    _same(ce32.predict(pairs[0]), st_ce.predict(pairs[0]))  # one pair: a numpy scalar
    _same(ce32.predict(pairs, convert_to_tensor=True), st_ce.predict(pairs, convert_to_tensor=True))
    _same(ce32.predict(pairs[:3], convert_to_numpy=False), st_ce.predict(pairs[:3], convert_to_numpy=False))
    ident = torch.nn.Identity()
    _same(ce32.predict(pairs, activation_fn=ident), st_ce.predict(pairs, activation_fn=ident))
    _same(ce32.predict(pairs, apply_softmax=True), st_ce.predict(pairs, apply_softmax=True))
    _same(ce32.predict([]), st_ce.predict([]))
    _same(ce32.predict(inputs=pairs[:2]), st_ce.predict(inputs=pairs[:2]))  # sentence-transformers 6's name


def test_rank_matches_sentence_transformers(st_ce: Any, ce32: CrossEncoder) -> None:
    group = load_dataset(need(WIKIQA_TEST))[1]
    for kwargs in ({}, {"top_k": 3, "return_documents": True}, {"activation_fn": torch.nn.Identity()}):
        ours = ce32.rank(group.query, group.documents, **kwargs)
        theirs = st_ce.rank(group.query, group.documents, **kwargs)
        assert [r["corpus_id"] for r in ours] == [r["corpus_id"] for r in theirs]
        for a, b in zip(ours, theirs, strict=True):
            assert a.keys() == b.keys()
            assert type(a["corpus_id"]) is type(b["corpus_id"]) is int
            assert type(a["score"]) is type(b["score"]) is float
            assert abs(a["score"] - b["score"]) < ATOL
            assert a.get("text") == b.get("text")


@pytest.mark.slow
def test_default_int8_keeps_wikiqa_ranking(reranker_int8_dir: Path, ce32: CrossEncoder) -> None:
    """The default precision through the compat class: MAP within 0.5% of fp32 on WikiQA-test-gold."""
    groups = load_dataset(need(WIKIQA_TEST))
    flat = pairs_of(groups)
    labels = [g.labels for g in groups]
    ce8 = CrossEncoder(str(reranker_int8_dir))
    map32 = evaluate_flat(labels, ce32.predict(flat, batch_size=256)).map
    map8 = evaluate_flat(labels, ce8.predict(flat, batch_size=256)).map
    print(f"\nWikiQA MAP via compat: fp32 {map32:.4f} int8 {map8:.4f} ({map8 / map32:.2%})")
    assert map8 >= 0.995 * map32


# --- SentenceTransformer ------------------------------------------------------------------------
def test_encode_matches_sentence_transformers(st_emb: Any, emb32: SentenceTransformer,
                                              texts: list[str]) -> None:
    assert emb32.max_seq_length == st_emb.max_seq_length == 256
    assert emb32.get_sentence_embedding_dimension() == 384
    assert emb32.get_embedding_dimension() == st_emb.get_embedding_dimension()
    assert emb32.prompts == st_emb.prompts
    _same(emb32.encode(texts), st_emb.encode(texts))
    _same(emb32.encode(texts[:20], batch_size=7, normalize_embeddings=True),
          st_emb.encode(texts[:20], batch_size=7, normalize_embeddings=True))
    _same(emb32.encode(texts[0]), st_emb.encode(texts[0]))  # one text: [D]
    _same(emb32.encode(texts[:5], convert_to_tensor=True), st_emb.encode(texts[:5], convert_to_tensor=True))
    _same(emb32.encode(texts[:3], convert_to_numpy=False), st_emb.encode(texts[:3], convert_to_numpy=False))
    _same(emb32.encode(texts[:9], truncate_dim=64), st_emb.encode(texts[:9], truncate_dim=64))
    _same(emb32.encode(texts[:9], truncate_dim=64, normalize_embeddings=True),
          st_emb.encode(texts[:9], truncate_dim=64, normalize_embeddings=True))
    _same(emb32.encode(texts[:4], prompt="query: "), st_emb.encode(texts[:4], prompt="query: "))
    _same(emb32.encode_query(texts[:4]), st_emb.encode_query(texts[:4]))
    _same(emb32.encode_document(texts[:4]), st_emb.encode_document(texts[:4]))
    _same(emb32.encode([]), st_emb.encode([]))
    _same(emb32.encode(inputs=texts[:3]), st_emb.encode(inputs=texts[:3]))  # sentence-transformers 6's name


def test_similarity_and_prompts_match(st_emb: Any, emb32: SentenceTransformer, texts: list[str],
                                      embedder_fp32_dir: Path) -> None:
    a, b = emb32.encode(texts[:6]), emb32.encode(texts[6:10])
    _same(emb32.similarity(a, b), st_emb.similarity(a, b))
    _same(emb32.similarity(torch.from_numpy(a), b[0]), st_emb.similarity(torch.from_numpy(a), b[0]))
    for name in ("dot", "euclidean", "manhattan"):
        ours = SentenceTransformer(str(embedder_fp32_dir), similarity_fn_name=name)
        theirs = st.SentenceTransformer(str(embedder_source()), device="cpu", similarity_fn_name=name)
        _same(ours.similarity(a, b), theirs.similarity(a, b))
    prompts = {"query": "query: ", "passage": "passage: "}
    ours = SentenceTransformer(str(embedder_fp32_dir), prompts=prompts, default_prompt_name="query")
    theirs = st.SentenceTransformer(str(embedder_source()), device="cpu", prompts=prompts,
                                    default_prompt_name="query")
    _same(ours.encode(texts[:4]), theirs.encode(texts[:4]))
    _same(ours.encode_document(texts[:4]), theirs.encode_document(texts[:4]))
    _same(ours.encode(texts[:4], prompt_name="passage"), theirs.encode(texts[:4], prompt_name="passage"))


@pytest.mark.parametrize("export", ["embedder_int8_dir", "embedder_int8_ir_dir"])
def test_default_int8_cosine_bar(export: str, st_emb: Any, texts: list[str], request: pytest.FixtureRequest,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Both int8 exports ``--backend auto`` may serve for an embedder: ONNX (ONNX Runtime) and the IR (OpenVINO)."""
    if export.endswith("_ir_dir"):
        monkeypatch.delenv("ENCAPURE_BACKEND", raising=False)  # the suite pins onnxruntime, which refuses an IR
    ours = SentenceTransformer(str(request.getfixturevalue(export))).encode(texts)
    theirs = st_emb.encode(texts)
    cos = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)
    print(f"\nint8 via compat, cosine to sentence-transformers: min {cos.min():.4f} mean {cos.mean():.4f}")
    assert cos.min() >= 0.993


def test_max_seq_length_setter(emb32: SentenceTransformer, st_emb: Any, embedder_fp32_dir: Path,
                               texts: list[str]) -> None:
    ours = SentenceTransformer(str(embedder_fp32_dir))
    ours.max_seq_length = 128
    st_emb.max_seq_length = 128
    try:
        assert ours.max_seq_length == 128
        long = [t for t in texts if len(t) > 1500][:4]
        _same(ours.encode(long), st_emb.encode(long))
    finally:
        st_emb.max_seq_length = 256


# --- batching, progress, refusals ---------------------------------------------------------------
def test_batch_size_bounds_every_forward(emb32: SentenceTransformer, ce32: CrossEncoder, texts: list[str],
                                         pairs: list[tuple[str, str]], monkeypatch: pytest.MonkeyPatch) -> None:
    for obj, call in ((emb32, lambda: emb32.encode(texts, batch_size=5)),
                      (ce32, lambda: ce32.predict(pairs, batch_size=5))):
        sizes: list[int] = []
        forward = obj.model.forward

        def spy(units: Any, _forward: Any = forward, _sizes: list[int] = sizes) -> Any:
            _sizes.append(len(units))
            return _forward(units)

        monkeypatch.setattr(obj.model, "forward", spy)
        call()
        monkeypatch.undo()
        assert sizes and max(sizes) <= 5


def test_bulk_batch_size_default(embedder_fp32_dir: Path, emb32: SentenceTransformer,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Small forward batches by default for bulk calls (measured faster and half the memory); the
    environment (or the caller's Settings) still decides when it says something."""
    from encapure.compat import BULK_MAX_BATCH_SIZE
    from encapure.settings import Settings

    assert emb32.model.settings.max_batch_size == BULK_MAX_BATCH_SIZE
    monkeypatch.setenv("ENCAPURE_MAX_BATCH_SIZE", "16")
    assert SentenceTransformer(str(embedder_fp32_dir)).model.settings.max_batch_size == 16
    mine = SentenceTransformer(str(embedder_fp32_dir), settings=Settings(max_batch_size=32))
    assert mine.model.settings.max_batch_size == 32


def test_progress_bar(emb32: SentenceTransformer, ce32: CrossEncoder, texts: list[str],
                      pairs: list[tuple[str, str]], capsys: pytest.CaptureFixture[str]) -> None:
    if importlib.util.find_spec("tqdm") is None:
        pytest.skip("tqdm is not installed")
    emb32.encode(texts, batch_size=50, show_progress_bar=True)
    err = capsys.readouterr().err
    assert f"{len(texts)}/{len(texts)}" in err
    ce32.predict(pairs, show_progress_bar=True)
    assert f"{len(pairs)}/{len(pairs)}" in capsys.readouterr().err
    emb32.encode(texts[:3], show_progress_bar=False)
    assert capsys.readouterr().err == ""


def test_unsupported_arguments_are_refused(reranker_fp32_dir: Path, embedder_fp32_dir: Path,
                                           emb32: SentenceTransformer) -> None:
    rr, em = str(reranker_fp32_dir), str(embedder_fp32_dir)
    with pytest.raises(ValueError, match="trust_remote_code"):
        CrossEncoder(rr, trust_remote_code=True)
    with pytest.raises(ValueError, match="trust_remote_code"):
        SentenceTransformer(em, trust_remote_code=True)
    with pytest.raises(ValueError, match="mps"):
        CrossEncoder(rr, device="mps")
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(ValueError, match="CUDAExecutionProvider"):
            SentenceTransformer(em, device="cuda")
    with pytest.raises(ValueError, match="torch_dtype"):
        SentenceTransformer(em, model_kwargs={"torch_dtype": "float16"})
    with pytest.raises(ValueError, match="revision"):
        CrossEncoder(rr, revision="main")
    with pytest.raises(ValueError, match="openvino"):
        SentenceTransformer(em, backend="openvino")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="exported fp32"):
        CrossEncoder(rr, precision="int8")
    with pytest.raises(ValueError, match="num_labels"):
        CrossEncoder(rr, num_labels=3)
    with pytest.raises(InvalidInputError, match="precision"):
        emb32.encode(["x"], precision="int8")
    with pytest.raises(InvalidInputError, match="output_value"):
        emb32.encode(["x"], output_value="token_embeddings")
    with pytest.raises(InvalidInputError, match="batch_size"):
        emb32.encode(["x"], batch_size=0)
    with pytest.raises(InvalidInputError, match="Prompt name"):
        emb32.encode(["x"], prompt_name="nope")
    with pytest.raises(InvalidInputError, match="device"):
        emb32.encode(["x"], device="cuda:1")
    assert emb32.device == "cpu" and emb32.encode(["x"], device="cpu").shape == (1, 384)
    with pytest.raises(InvalidInputError, match="truncate_dim"):
        emb32.encode(["x"], truncate_dim=999)
    assert CrossEncoder(rr, precision="fp32", model_kwargs={"precision": "fp32"}).num_labels == 1


# --- integrations, with our class substituted ---------------------------------------------------
def test_langchain_huggingface_cross_encoder(monkeypatch: pytest.MonkeyPatch, reranker_fp32_dir: Path,
                                             st_ce: Any, pairs: list[tuple[str, str]]) -> None:
    pytest.importorskip("langchain_community", reason="langchain-community is not installed (compat-test extra)")
    from langchain_community.cross_encoders import HuggingFaceCrossEncoder

    import encapure.compat

    monkeypatch.setattr(st, "CrossEncoder", encapure.compat.CrossEncoder)
    hf = HuggingFaceCrossEncoder(model_name=str(reranker_fp32_dir), model_kwargs={"device": "cpu"})
    assert isinstance(hf.client, encapure.compat.CrossEncoder)
    scores = hf.score(pairs)
    monkeypatch.undo()
    np.testing.assert_allclose(np.asarray(list(scores)), st_ce.predict(pairs), atol=ATOL)


def test_llama_index_sentence_transformer_rerank(monkeypatch: pytest.MonkeyPatch, reranker_fp32_dir: Path,
                                                 st_ce: Any) -> None:
    pytest.importorskip("llama_index.core", reason="llama-index-core is not installed (compat-test extra)")
    from llama_index.core.postprocessor import SentenceTransformerRerank
    from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode

    import encapure.compat

    group = load_dataset(need(WIKIQA_TEST))[1]
    monkeypatch.setattr(st, "CrossEncoder", encapure.compat.CrossEncoder)
    # llama-index defaults to trust_remote_code=True, which we refuse: Encapure runs no repository code.
    with pytest.raises(ValueError, match="trust_remote_code"):
        SentenceTransformerRerank(model=str(reranker_fp32_dir), top_n=3, device="cpu")
    rerank = SentenceTransformerRerank(model=str(reranker_fp32_dir), top_n=3, device="cpu",
                                       trust_remote_code=False)
    nodes = [NodeWithScore(node=TextNode(text=d, id_=str(i)), score=0.0) for i, d in enumerate(group.documents)]
    out = rerank.postprocess_nodes(nodes, query_bundle=QueryBundle(group.query))
    monkeypatch.undo()
    # llama-index sets max_length=512: ours and sentence-transformers both honour it.
    expected = st.CrossEncoder(str(need(RERANKER_FIXTURE)), device="cpu", max_length=512).rank(
        group.query, group.documents, top_k=3)
    assert [n.node.id_ for n in out] == [str(r["corpus_id"]) for r in expected]
    np.testing.assert_allclose([n.score for n in out], [r["score"] for r in expected], atol=ATOL)


def test_haystack_sentence_transformers_components(monkeypatch: pytest.MonkeyPatch, reranker_fp32_dir: Path,
                                                   embedder_fp32_dir: Path, st_ce: Any, st_emb: Any,
                                                   texts: list[str]) -> None:
    pytest.importorskip("haystack_integrations.components.rankers.sentence_transformers",
                        reason="sentence-transformers-haystack is not installed (compat-test extra)")
    from haystack import Document
    from haystack.utils import ComponentDevice
    from haystack_integrations.components.embedders.sentence_transformers import (
        SentenceTransformersDocumentEmbedder,
        SentenceTransformersTextEmbedder,
    )
    from haystack_integrations.components.embedders.sentence_transformers.embedding_backend import backend
    from haystack_integrations.components.rankers.sentence_transformers import (
        SentenceTransformersSimilarityRanker,
        sentence_transformers_similarity,
    )

    import encapure.compat

    for var in ("HF_API_TOKEN", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(sentence_transformers_similarity, "CrossEncoder", encapure.compat.CrossEncoder)
    monkeypatch.setattr(backend, "SentenceTransformer", encapure.compat.SentenceTransformer)
    monkeypatch.setattr(backend._SentenceTransformersEmbeddingBackendFactory, "_instances", {})
    cpu = ComponentDevice.from_str("cpu")

    group = load_dataset(need(WIKIQA_TEST))[1]
    ranker = SentenceTransformersSimilarityRanker(model=str(reranker_fp32_dir), device=cpu, top_k=4)
    ranker.warm_up()
    ranked = ranker.run(query=group.query, documents=[Document(content=d) for d in group.documents])["documents"]
    expected = st_ce.rank(group.query, group.documents, top_k=4)
    assert [d.content for d in ranked] == [group.documents[r["corpus_id"]] for r in expected]
    np.testing.assert_allclose([d.score for d in ranked], [r["score"] for r in expected], atol=ATOL)

    text_embedder = SentenceTransformersTextEmbedder(model=str(embedder_fp32_dir), device=cpu, progress_bar=False)
    text_embedder.warm_up()
    vec = text_embedder.run(text=texts[0])["embedding"]
    assert isinstance(vec, list) and isinstance(vec[0], float)
    np.testing.assert_allclose(vec, st_emb.encode(texts[0]), atol=ATOL)

    doc_embedder = SentenceTransformersDocumentEmbedder(model=str(embedder_fp32_dir), device=cpu,
                                                        progress_bar=False, normalize_embeddings=True)
    doc_embedder.warm_up()
    docs = doc_embedder.run(documents=[Document(content=t) for t in texts[:10]])["documents"]
    np.testing.assert_allclose([d.embedding for d in docs],
                               st_emb.encode(texts[:10], normalize_embeddings=True), atol=ATOL)

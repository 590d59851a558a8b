"""Real, unmodified client SDKs from PyPI against a real server: openai and cohere (v1 and v2)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from encapure.server.testing import ServerProcess

KEY = "sdk-key"


@pytest.fixture(scope="module")
def server(reranker_fp32_dir: Path, embedder_fp32_dir: Path) -> Iterator[ServerProcess]:
    with ServerProcess(
        ["--model", f"rr={reranker_fp32_dir}", "--model", f"emb={embedder_fp32_dir}"], api_key=KEY
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def engine(reranker_fp32_dir: Path, embedder_fp32_dir: Path) -> dict[str, Any]:
    from encapure.engine import load_model

    return {"rr": load_model(reranker_fp32_dir, name="rr"), "emb": load_model(embedder_fp32_dir, name="emb")}


def _embed(model: Any, texts: list[str]) -> np.ndarray:
    p = model.prepare_texts(texts)
    return np.asarray(model.finish(p, model.forward(p.units)).embeddings)


def _scores(model: Any, query: str, docs: list[str]) -> np.ndarray:
    p = model.prepare_pairs(query, docs)
    return np.asarray(model.finish(p, model.forward(p.units)).scores)


TEXTS = ["The quick brown fox.", "Paris is the capital of France.", "Quantum chromodynamics"]
QUERY = "What is the capital of France?"


def test_openai_sdk_embeddings_base64_default_and_float(server: ServerProcess, engine: dict[str, Any]) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    expected = _embed(engine["emb"], TEXTS)
    default = client.embeddings.create(model="emb", input=TEXTS)  # the SDK asks for base64 and decodes it
    got = np.array([d.embedding for d in default.data], dtype=np.float32)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert default.model == "emb" and default.usage.total_tokens > 0
    as_float = client.embeddings.create(model="emb", input=TEXTS, encoding_format="float")
    np.testing.assert_allclose(np.array([d.embedding for d in as_float.data]), expected, atol=1e-5)
    single = client.embeddings.create(model="emb", input="Paris is the capital of France.", dimensions=64)
    assert len(single.data[0].embedding) == 64
    assert [m.id for m in client.models.list()] == ["rr", "emb"]

    import openai

    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).embeddings.create(model="emb", input="x")
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="rr", input="x")
    assert "rerank" in str(e.value)


def test_cohere_sdk_v1_rerank(server: ServerProcess, engine: dict[str, Any]) -> None:
    import cohere

    co = cohere.Client(api_key=KEY, base_url=server.url)
    res = co.rerank(model="rr", query=QUERY, documents=TEXTS, top_n=2, return_documents=True)
    expected = _scores(engine["rr"], QUERY, TEXTS)
    order = np.argsort(-expected, kind="stable")[:2].tolist()
    assert [r.index for r in res.results] == order
    for r in res.results:
        assert r.relevance_score == pytest.approx(float(expected[r.index]), abs=2e-5)
        assert r.document is not None and r.document.text == TEXTS[r.index]


def test_cohere_sdk_v2_rerank(server: ServerProcess, engine: dict[str, Any]) -> None:
    import cohere

    co = cohere.ClientV2(api_key=KEY, base_url=server.url)
    res = co.rerank(model="rr", query=QUERY, documents=TEXTS)
    expected = _scores(engine["rr"], QUERY, TEXTS)
    assert [r.index for r in res.results] == np.argsort(-expected, kind="stable").tolist()
    for r in res.results:
        assert r.relevance_score == pytest.approx(float(expected[r.index]), abs=2e-5)

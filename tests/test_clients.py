"""Real, unmodified client SDKs from PyPI against the service: openai and cohere (v1 and v2).

The service is uvicorn in a thread over stand-in models (``tests/fakes.py``): what the SDKs see is
the wire format, and the numbers they decode must be what the engine computes for the same input.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fakes import fake_model

from encapure.server.testing import ThreadedServer
from encapure.settings import Settings

KEY = "sdk-key"


@pytest.fixture(scope="module")
def engine() -> dict[str, Any]:
    return {"rr": fake_model("rerank", name="rr"), "emb": fake_model("embed", name="emb", dim=128)}


@pytest.fixture(scope="module")
def server(engine: dict[str, Any]) -> Iterator[ThreadedServer]:
    with ThreadedServer(engine, Settings(api_key=KEY)) as srv:
        yield srv


def _embed(model: Any, texts: list[str]) -> np.ndarray:
    p = model.prepare_texts(texts)
    return np.asarray(model.finish(p, model.forward(p.units)).embeddings)


def _scores(model: Any, query: str, docs: list[str]) -> np.ndarray:
    p = model.prepare_pairs(query, docs)
    return np.asarray(model.finish(p, model.forward(p.units)).scores)


TEXTS = ["The quick brown fox.", "Paris is the capital of France.", "Quantum chromodynamics"]
QUERY = "What is the capital of France?"


def test_openai_sdk_embeddings_base64_default_and_float(server: ThreadedServer, engine: dict[str, Any]) -> None:
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


def test_cohere_sdk_v1_rerank(server: ThreadedServer, engine: dict[str, Any]) -> None:
    import cohere

    co = cohere.Client(api_key=KEY, base_url=server.url)
    res = co.rerank(model="rr", query=QUERY, documents=TEXTS, top_n=2, return_documents=True)
    expected = _scores(engine["rr"], QUERY, TEXTS)
    order = np.argsort(-expected, kind="stable")[:2].tolist()
    assert [r.index for r in res.results] == order
    for r in res.results:
        assert r.relevance_score == pytest.approx(float(expected[r.index]), abs=2e-5)
        assert r.document is not None and r.document.text == TEXTS[r.index]


def test_cohere_sdk_v2_rerank(server: ThreadedServer, engine: dict[str, Any]) -> None:
    import cohere

    co = cohere.ClientV2(api_key=KEY, base_url=server.url)
    res = co.rerank(model="rr", query=QUERY, documents=TEXTS)
    expected = _scores(engine["rr"], QUERY, TEXTS)
    assert [r.index for r in res.results] == np.argsort(-expected, kind="stable").tolist()
    for r in res.results:
        assert r.relevance_score == pytest.approx(float(expected[r.index]), abs=2e-5)

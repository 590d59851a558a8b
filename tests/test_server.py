"""The HTTP service as clients see it: every route's shape, status codes and JSON error bodies.

Most tests run the app in-process (``InProcessServer``: ``httpx.ASGITransport``, lifespan started)
over stand-in models (``tests/fakes.py``): the real engine path (tokenizer, batching, padding,
folding, activation) around a fake ONNX Runtime session whose output is a fixed function of each
row's own tokens, so "the server answers what the engine computes for this input alone" is exact
and needs no export. The socket-level body limits run under uvicorn in a thread
(``ThreadedServer``); one slow test checks real-model scores through a real ``encapure serve``.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import random
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fakes import FAIL_WORD, fake_model

from encapure.engine.model import OnnxModel
from encapure.errors import InvalidInputError
from encapure.server.testing import InProcessServer, ServerProcess, ThreadedServer
from encapure.settings import Settings

pytestmark = pytest.mark.anyio

KEY = "test-key"
WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "paris", "france", "capital", "river", "bank", "money", "loan", "interest", "rate", "neural", "network", "model", "token", "embedding", "search", "query", "document", "answer", "question", "light", "speed", "physics", "energy", "matter"]


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def settings() -> Settings:
    return Settings(
        api_key=KEY,
        max_request_bytes=100_000,
        max_client_batch_size=64,
        request_timeout_s=300,  # the shared test machine can be slow; deadlines have their own test
    )


@pytest.fixture(scope="module")
def models() -> dict[str, OnnxModel]:
    # A few ms per batch, so that concurrent requests really queue and share batches.
    return {
        "rr": fake_model("rerank", name="rr", base_s=0.003, per_token_s=1e-6),
        "emb": fake_model("embed", name="emb", base_s=0.003, per_token_s=1e-6),
    }


@pytest.fixture
def engine_reranker(models: dict[str, OnnxModel]) -> OnnxModel:
    return models["rr"]


@pytest.fixture
def engine_embedder(models: dict[str, OnnxModel]) -> OnnxModel:
    return models["emb"]


@pytest.fixture
async def srv(anyio_backend: str, models: dict[str, OnnxModel]) -> AsyncIterator[InProcessServer]:
    async with InProcessServer(models, settings()) as s:
        yield s


@pytest.fixture
async def client(srv: InProcessServer) -> httpx.AsyncClient:
    return srv.client


@pytest.fixture
def tcp_server(models: dict[str, OnnxModel]) -> Iterator[ThreadedServer]:
    with ThreadedServer(models, settings()) as s:
        yield s


def engine_scores(model: Any, query: str, docs: list[str], raw: bool = False) -> np.ndarray:
    prepared = model.prepare_pairs(query, docs, raw_scores=raw)
    return np.asarray(model.finish(prepared, model.forward(prepared.units)).scores)


def engine_embed(model: Any, texts: list[str], **kw: Any) -> np.ndarray:
    prepared = model.prepare_texts(texts, **kw)
    return np.asarray(model.finish(prepared, model.forward(prepared.units)).embeddings)


def assert_error(r: httpx.Response, status: int, kind: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    err = body["error"]
    assert set(err) == {"type", "message", "request_id"}
    assert err["message"] and "Traceback" not in err["message"]
    assert err["request_id"] == r.headers["x-request-id"]
    if kind is not None:
        assert err["type"] == kind, err
    return err


def random_requests(seed: int, n: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    requests = []
    for i in range(n):
        n_docs = rng.choice([1, 2, 3, 5, 8, 12])
        docs = [sentence(rng, rng.randint(2, 40)) for _ in range(n_docs)]
        requests.append({"query": sentence(rng, rng.randint(2, 12)), "documents": docs, "top_n": 1 + i % 5})
    return requests


def check_concurrent_answers(
    requests: list[dict[str, Any]], responses: list[httpx.Response], engine: Any, metrics: str, atol: float
) -> None:
    """Each answer is what the engine gives that request alone, and some batch mixed requests."""
    assert [r.status_code for r in responses] == [200] * len(requests), [
        r.text for r in responses if r.status_code != 200
    ][:3]
    for body, r in zip(requests, responses, strict=True):
        got = r.json()
        expected = engine_scores(engine, body["query"], body["documents"])
        np.testing.assert_allclose(got["scores"], expected, rtol=0, atol=atol)
        order = np.argsort(-np.asarray(got["scores"]), kind="stable")[: body["top_n"]]
        assert [x["index"] for x in got["results"]] == order.tolist()
        assert got["model"] == "rr"
        assert got["usage"]["total_tokens"] > 0
    values = {}
    for line in metrics.splitlines():
        if line.startswith("encapure_batch_requests_") and 'model="rr"' in line:
            key, _, value = line.rpartition(" ")
            values[key] = float(value)
    single = next(v for k, v in values.items() if k.startswith("encapure_batch_requests_bucket") and 'le="1.0"' in k)
    total = next(v for k, v in values.items() if k.startswith("encapure_batch_requests_count"))
    assert total > single, (total, single)  # some batch carried units of several requests


# --- concurrency and correctness ----------------------------------------------------------------
async def test_100_concurrent_reranks_equal_engine_alone(srv: InProcessServer, engine_reranker: Any) -> None:
    requests = random_requests(7, 100)
    responses = await asyncio.gather(*(srv.client.post("/rerank", json=body) for body in requests))
    # the stand-in's rows do not depend on their batch-mates: batched answers are exact
    metrics = (await srv.client.get("/metrics")).text
    check_concurrent_answers(requests, responses, engine_reranker, metrics, atol=1e-7)


@pytest.mark.slow
def test_100_concurrent_reranks_equal_engine_alone_real_model(reranker_fp32_dir: Path) -> None:
    """The same through a real ``encapure serve`` on the exported fp32 reranker (padding and
    batching in ONNX Runtime keep scores within 2e-5 of the model run alone)."""
    from encapure.engine import load_model

    engine = load_model(reranker_fp32_dir, name="rr")
    requests = random_requests(7, 100)
    with ServerProcess(["--model", f"rr={reranker_fp32_dir}", "--request-timeout", "300"], api_key=KEY) as server:

        async def go() -> list[httpx.Response]:
            limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
            async with httpx.AsyncClient(
                base_url=server.url, headers=server.headers, timeout=120, limits=limits
            ) as c:
                return await asyncio.gather(*(c.post("/rerank", json=body) for body in requests))

        responses = asyncio.run(go())
        metrics = httpx.get(server.url + "/metrics", headers=server.headers).text
    check_concurrent_answers(requests, responses, engine, metrics, atol=2e-5)


# --- routes and shapes -------------------------------------------------------------------------------
async def test_native_rerank_aliases_and_documents(client: httpx.AsyncClient, engine_reranker: Any) -> None:
    docs = ["Paris is the capital of France.", {"text": "The cat sat on the mat.", "id": "d2"}, "Berlin."]
    r = await client.post(
        "/rerank",
        json={"query": "capital of France", "documents": docs, "top_k": 2, "return_text": True},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    texts = [d if isinstance(d, str) else d["text"] for d in docs]
    expected = engine_scores(engine_reranker, "capital of France", texts)
    np.testing.assert_allclose(body["scores"], expected, atol=2e-5)
    assert len(body["results"]) == 2
    top = body["results"][0]
    assert top["index"] == int(np.argmax(expected))
    assert top["document"] == docs[top["index"]]
    assert top["relevance_score"] == top["score"]  # Infinity's and vLLM's name for it
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"]
    assert body["object"] == "rerank"
    assert all(0.0 <= s <= 1.0 for s in body["scores"])
    for h in ("x-request-id", "x-queue-time", "x-inference-time", "x-total-time", "x-total-tokens"):
        assert h in r.headers
    assert int(r.headers["x-total-tokens"]) == body["usage"]["total_tokens"]

    raw = (await client.post("/rerank", json={"query": "capital of France", "documents": texts, "raw_scores": True})).json()
    np.testing.assert_allclose(raw["scores"], engine_scores(engine_reranker, "capital of France", texts, raw=True),
                               atol=2e-4)


async def test_tei_rerank_shape(client: httpx.AsyncClient, engine_reranker: Any) -> None:
    """``texts`` is TEI's request: the answer is TEI's bare list sorted by score, ``text`` only
    with ``return_text``; ``raw_scores``, ``truncate: null`` and ``truncation_direction`` as TEI."""
    q, texts = "capital of France", ["The cat sat.", "Paris is the capital of France.", "Berlin."]
    expected = engine_scores(engine_reranker, q, texts)
    r = await client.post("/rerank", json={"query": q, "texts": texts, "truncate": None})
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body, list) and [set(x) for x in body] == [{"index", "score"}] * 3
    assert [x["index"] for x in body] == np.argsort(-expected, kind="stable").tolist()
    np.testing.assert_allclose([x["score"] for x in body], np.sort(expected)[::-1], atol=2e-5)
    with_text = (await client.post("/rerank", json={"query": q, "texts": texts, "return_text": True,
                                                     "raw_scores": True})).json()
    assert all(x["text"] == texts[x["index"]] for x in with_text)
    raw = engine_scores(engine_reranker, q, texts, raw=True)
    np.testing.assert_allclose(sorted(x["score"] for x in with_text), np.sort(raw), atol=2e-4)
    both = await client.post("/rerank", json={"query": q, "texts": texts, "documents": texts})
    assert "exactly one" in assert_error(both, 400)["message"]


async def test_truncation_direction_left_keeps_the_end(client: httpx.AsyncClient, engine_reranker: Any,
                                                       engine_embedder: Any) -> None:
    """TEI's ``truncation_direction: "Left"`` on a right-truncating model cuts the start instead."""
    tail = "Paris is the capital of France."
    long_doc = " ".join(["filler words about nothing"] * 150) + " " + tail
    q = "capital of France"
    left = (await client.post("/rerank", json={"query": q, "texts": [long_doc], "truncation_direction": "Left"})).json()
    right = (await client.post("/rerank", json={"query": q, "texts": [long_doc]})).json()
    assert left[0]["score"] != pytest.approx(right[0]["score"], abs=1e-6)
    right2 = (await client.post("/rerank", json={"query": q, "texts": [long_doc], "truncation_direction": "Right"})).json()
    assert right2[0]["score"] == pytest.approx(right[0]["score"], abs=1e-7)
    # the left cut is what the model gives for the document's end
    enc = engine_reranker.encode_batch([long_doc], "raw", add_special_tokens=False)[0]
    q_len = len(engine_reranker.encode_batch([q], "raw", add_special_tokens=False)[0].ids)
    room = engine_reranker.max_length - 3 - q_len
    end_part = long_doc[enc.offsets[len(enc.ids) - room][0]:]
    assert left[0]["score"] == pytest.approx(float(engine_scores(engine_reranker, q, [end_part])[0]), abs=2e-5)
    e_left = (await client.post("/embed", json={"inputs": long_doc, "truncation_direction": "Left"})).json()
    e_right = (await client.post("/embed", json={"inputs": long_doc})).json()
    assert not np.allclose(e_left, e_right)
    enc_e = engine_embedder.encode_batch([long_doc], "raw", add_special_tokens=False)[0]
    end_e = long_doc[enc_e.offsets[len(enc_e.ids) - (engine_embedder.max_length - 2)][0]:]
    np.testing.assert_allclose(e_left, engine_embed(engine_embedder, [end_e]), atol=1e-5)


async def test_unknown_model_name_served_by_the_one_able_model(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/rerank", json={"model": "rerank-english-v3.0", "query": "q", "documents": ["d"]})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "rr"  # the answer names the model that answered
    e = await client.post("/v1/embeddings", json={"model": "text-embedding-3-small", "input": "hi"})
    assert e.status_code == 200 and e.json()["model"] == "emb"


async def test_strict_model_names_404(models: dict[str, OnnxModel]) -> None:
    async with InProcessServer(models, Settings(strict_model_names=True)) as srv:
        r = await srv.client.post("/v1/rerank", json={"model": "rerank-english-v3.0", "query": "q", "documents": ["d"]})
        assert "rerank-english-v3.0" in assert_error(r, 404, "not_found_error")["message"]
        assert (await srv.client.post("/v1/rerank", json={"model": "rr", "query": "q", "documents": ["d"]})).status_code == 200


async def test_model_aliases(models: dict[str, OnnxModel]) -> None:
    """``--model NAME,ALIAS=...``: an alias answers even with --strict-model-names."""
    from encapure.server.loading import parse_specs

    specs = parse_specs(Settings(model=["rerank-english-v3.0,rr=/models/x", "emb=/models/y"]))
    assert [(s.name, s.aliases) for s in specs] == [("rerank-english-v3.0", ("rr",)), ("emb", ())]
    with pytest.raises(InvalidInputError, match="two models"):
        parse_specs(Settings(model=["a,b=/x", "b=/y"]))
    with pytest.raises(InvalidInputError, match="empty name"):
        parse_specs(Settings(model=["a,=/x"]))
    async with InProcessServer(models, Settings(strict_model_names=True), aliases={"rerank-english-v3.0": "rr"}) as srv:
        r = await srv.client.post("/v1/rerank", json={"model": "rerank-english-v3.0", "query": "q", "documents": ["d"]})
        assert r.status_code == 200 and r.json()["model"] == "rr"
        card = (await srv.client.get("/v1/models/rerank-english-v3.0")).json()
        assert card["id"] == "rr" and card["aliases"] == ["rerank-english-v3.0"]


async def test_two_able_models_unknown_name_404(anyio_backend: str) -> None:
    two = {"a": fake_model("rerank", name="a"), "b": fake_model("rerank", name="b", seed=1)}
    async with InProcessServer(two, Settings()) as srv:
        r = await srv.client.post("/rerank", json={"model": "nope", "query": "q", "documents": ["d"]})
        assert "2 loaded models" in assert_error(r, 404, "not_found_error")["message"]


async def test_cohere_v2_max_tokens_per_doc_is_honoured(client: httpx.AsyncClient, engine_reranker: Any) -> None:
    q, doc = "capital", "Paris is the capital of France and a large city on the Seine."
    r = (await client.post("/v2/rerank", json={"query": q, "documents": [doc], "max_tokens_per_doc": 3})).json()
    enc = engine_reranker.encode_batch([doc], "raw", add_special_tokens=False)[0]
    cut = doc[: enc.offsets[2][1]]
    assert cut == "Paris is the"
    assert r["results"][0]["relevance_score"] == pytest.approx(float(engine_scores(engine_reranker, q, [cut])[0]),
                                                               abs=2e-5)
    assert r["usage"]["total_tokens"] == len(engine_reranker.encode_batch([(q, cut)], "raw")[0].ids)


async def test_cohere_v1_rank_fields_and_max_chunks(client: httpx.AsyncClient, engine_reranker: Any) -> None:
    docs = [{"title": "France", "body": "Paris is the capital."}, {"title": "Cats", "body": "They sit on mats."}]
    r = await client.post("/v1/rerank", json={"query": "capital", "documents": docs, "rank_fields": ["title", "body"],
                                              "return_documents": True})
    assert r.status_code == 200, r.text
    scored = ["title: France\nbody: Paris is the capital.", "title: Cats\nbody: They sit on mats."]
    expected = engine_scores(engine_reranker, "capital", scored)
    got = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
    np.testing.assert_allclose([got[0], got[1]], expected, atol=2e-5)
    assert r.json()["results"][0]["document"] == docs[r.json()["results"][0]["index"]]
    missing = await client.post("/v1/rerank", json={"query": "q", "documents": docs, "rank_fields": ["nope"]})
    assert "nope" in assert_error(missing, 400)["message"]
    no_text = await client.post("/v1/rerank", json={"query": "q", "documents": docs})
    assert "rank_fields" in assert_error(no_text, 400)["message"]
    # max_chunks_per_doc: 1 is plain truncation; N > 1 scores the best of at most N windows
    long_doc = " ".join(["filler words about nothing"] * 150) + " Paris is the capital of France."
    q = "capital of France"
    one = (await client.post("/v1/rerank", json={"query": q, "documents": [long_doc], "max_chunks_per_doc": 1})).json()
    assert one["results"][0]["relevance_score"] == pytest.approx(float(engine_scores(engine_reranker, q, [long_doc])[0]),
                                                                 abs=2e-5)
    many = (await client.post("/v1/rerank", json={"query": q, "documents": [long_doc], "max_chunks_per_doc": 50})).json()
    p = engine_reranker.prepare_pairs(q, [long_doc], long_documents="window")
    windows = engine_reranker.finish(p, engine_reranker.forward(p.units)).scores
    assert many["results"][0]["relevance_score"] == pytest.approx(float(windows[0]), abs=2e-5)
    two = (await client.post("/v1/rerank", json={"query": q, "documents": [long_doc], "max_chunks_per_doc": 2})).json()
    assert one["usage"]["total_tokens"] < two["usage"]["total_tokens"] <= 2 * engine_reranker.max_length
    assert two["usage"]["total_tokens"] < many["usage"]["total_tokens"]


async def test_prompt_name_and_user(client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture) -> None:
    bad = await client.post("/embed", json={"inputs": "hi", "prompt_name": "classification"})
    assert "classification" in assert_error(bad, 400)["message"]
    assert (await client.post("/embed", json={"inputs": "hi", "prompt_name": "query"})).status_code == 200
    with caplog.at_level(logging.INFO, logger="encapure"):
        ok = await client.post("/v1/embeddings", json={"input": "hi", "user": "user-1234"})
        await client.post("/", json={"inputs": "hi"})
        await client.get("/v1/models/emb")
    assert ok.status_code == 200, ok.text
    lines = [r for r in caplog.records if r.getMessage() == "request"]
    assert any(getattr(r, "user", None) == "user-1234" for r in lines)  # OpenAI's user id: logged, nothing else
    assert any(getattr(r, "route", None) == "/" and getattr(r, "dispatched_to", None) == "/embed" for r in lines)
    assert 'route="/v1/models/{model_id:path}"' in (await client.get("/metrics")).text  # not "unmatched"


async def test_root_and_invocations_dispatch_by_shape(client: httpx.AsyncClient, engine_embedder: Any,
                                                      engine_reranker: Any) -> None:
    """TEI's ``POST /`` (and SageMaker's ``/invocations``) answer as the route the request's shape
    and the models' tasks mean; GET / and /ping answer too."""
    for path in ("/", "/invocations"):
        e = await client.post(path, json={"inputs": ["hello world", "bye"]})
        assert e.status_code == 200, e.text
        np.testing.assert_allclose(e.json(), engine_embed(engine_embedder, ["hello world", "bye"]), atol=1e-5)
        r = (await client.post(path, json={"query": "capital", "texts": ["a", "Paris capital"]})).json()
        assert isinstance(r, list) and {x["index"] for x in r} == {0, 1}
        n = (await client.post(path, json={"query": "capital", "documents": ["a"]})).json()
        assert n["model"] == "rr"
        p = (await client.post(path, json={"inputs": [["capital", "Paris"]]})).json()
        expected = engine_scores(engine_reranker, "capital", ["Paris"])
        assert p[0][0]["score"] == pytest.approx(float(expected[0]), abs=2e-5)
        o = (await client.post(path, json={"input": "hello world"})).json()
        assert o["object"] == "list"
        sim = (await client.post(path, json={"inputs": {"source_sentence": "hello", "sentences": ["hello", "cat"]}}))
        assert sim.status_code == 200 and sim.json()[0] == pytest.approx(1.0, abs=1e-5)
        assert "inputs" in assert_error(await client.post(path, json={"what": 1}), 400)["message"]
        assert_error(await client.post(path, content=b"{nope"), 400)
        assert_error(await client.post(path, json={"inputs": 3}), 400)
    root = (await client.get("/")).json()
    assert root["models"] == {"rr": "rerank", "emb": "embed"}
    assert (await client.get("/ping")).status_code == 200


async def test_root_hub_classification_and_predict_batches(client: httpx.AsyncClient, engine_reranker: Any) -> None:
    """The hub's text-classification request (``parameters``) gets the hub's list-per-input shape;
    ``function_to_apply`` and ``top_k`` are honoured or refused. /predict reads a list of strings
    other than two as a batch of texts, as TEI does."""
    q = {"inputs": [["capital", "Paris"]], "parameters": {"top_k": 1, "function_to_apply": "sigmoid"}}
    r = (await client.post("/", json=q)).json()
    assert r == [[{"label": "LABEL_0", "score": pytest.approx(float(engine_scores(engine_reranker, "capital",
                                                                                  ["Paris"])[0]), abs=2e-5)}]]
    raw = (await client.post("/", json={**q, "parameters": {"function_to_apply": "none"}})).json()
    assert raw[0][0]["score"] == pytest.approx(float(engine_scores(engine_reranker, "capital", ["Paris"], raw=True)[0]),
                                               abs=2e-4)
    bad = await client.post("/", json={**q, "parameters": {"function_to_apply": "softmax"}})
    assert "sigmoid" in assert_error(bad, 400)["message"]
    assert_error(await client.post("/", json={**q, "parameters": {"top_k": 0}}), 400)


async def test_predict_single_texts_and_mixed_batches_on_a_reranker(client: httpx.AsyncClient,
                                                                    engine_reranker: Any) -> None:
    """As TEI: a reranker scores a single text (the cross-encoder on one sequence), and a batch may
    mix texts and pairs; each answer is what that input gets alone."""
    from encapure.engine.types import Unit

    def alone(text: str) -> float:
        enc = engine_reranker.encode_batch([text], "single")[0]
        row = engine_reranker.forward([Unit(ids=np.asarray(enc.ids), type_ids=np.asarray(enc.type_ids))])
        return float(1 / (1 + np.exp(-row[0, 0])))

    one = (await client.post("/predict", json={"inputs": "Paris is the capital of France"})).json()
    assert one == [{"label": "LABEL_0", "score": pytest.approx(alone("Paris is the capital of France"), abs=2e-5)}]
    three = (await client.post("/predict", json={"inputs": ["a cat", "b dog", "c"]})).json()
    assert [x[0]["score"] for x in three] == [pytest.approx(alone(t), abs=2e-5) for t in ("a cat", "b dog", "c")]
    mixed = (await client.post("/predict", json={"inputs": [["capital", "Paris"], ["a cat"], ["q", "d"]]})).json()
    pair_scores = engine_scores(engine_reranker, "capital", ["Paris"]).tolist() + \
        engine_scores(engine_reranker, "q", ["d"]).tolist()
    assert [x[0]["score"] for x in mixed] == [pytest.approx(pair_scores[0], abs=2e-5),
                                             pytest.approx(alone("a cat"), abs=2e-5),
                                             pytest.approx(pair_scores[1], abs=2e-5)]
    assert_error(await client.post("/predict", json={"inputs": [["a", "b", "c"]]}), 400)


async def test_tei_extras_decode_similarity_ids_aliases(client: httpx.AsyncClient, engine_embedder: Any,
                                                        srv: InProcessServer) -> None:
    toks = (await client.post("/tokenize", json={"inputs": "hello world", "model": "emb"})).json()[0]
    ids = [t["id"] for t in toks]
    assert (await client.post("/decode", json={"ids": ids})).json() == ["hello world"]
    assert (await client.post("/decode", json={"ids": [ids, ids[1:2]]})).json() == ["hello world", "hello"]
    assert_error(await client.post("/decode", json={"ids": [10**9]}), 400)
    by_ids = (await client.post("/embed", json={"inputs": [ids[1:-1]]})).json()
    np.testing.assert_allclose(by_ids, engine_embed(engine_embedder, ["hello world"]), atol=1e-5)
    mixed = (await client.post("/embed", json={"inputs": ["bye", ids[1:-1]]})).json()
    np.testing.assert_allclose(mixed, engine_embed(engine_embedder, ["bye", "hello world"]), atol=1e-5)
    sentences = ["hello there", "quantum physics"]
    sim = (await client.post("/similarity", json={"inputs": {"source_sentence": "hello", "sentences": sentences}})).json()
    v = engine_embed(engine_embedder, ["hello", *sentences])
    np.testing.assert_allclose(sim, v[1:] @ v[0], atol=1e-5)
    assert (await client.post("/similarity", json={"inputs": {"source_sentence": "x", "sentences": []}})).json() == []
    alias = (await client.post("/embeddings", json={"input": "hello world"})).json()
    np.testing.assert_allclose(alias["data"][0]["embedding"], engine_embed(engine_embedder, ["hello world"])[0],
                               atol=1e-5)
    infinity, openai = (await client.get("/models")).json(), (await client.get("/v1/models")).json()
    assert {m["owned_by"] for m in infinity["data"]} == {"infinity"}  # Infinity's client accepts only this
    assert {m["owned_by"] for m in openai["data"]} == {"encapure"}
    assert [{**m, "owned_by": None} for m in infinity["data"]] == [{**m, "owned_by": None} for m in openai["data"]]
    assert {m["id"]: m["capabilities"] for m in openai["data"]}["emb"] == ["embed"]
    one = (await client.get("/v1/models/emb")).json()
    assert one["id"] == "emb" and one["object"] == "model"
    assert_error(await client.get("/v1/models/text-embedding-3-small"), 404, "not_found_error")
    assert (await srv.new_client().get("/ping")).status_code == 200  # a probe: no key


# The response schemas of text-embeddings-inference's OpenAPI document (docs/openapi.json, 1.7),
# written out as JSON Schema: what TEI's clients may rely on.
_NUM = {"type": "number"}
_PREDICTION = {"type": "object", "required": ["score", "label"],
               "properties": {"label": {"type": "string"}, "score": _NUM}}
TEI_SCHEMAS: dict[str, dict[str, Any]] = {
    "/rerank": {"type": "array", "items": {
        "type": "object", "required": ["index", "score"],
        "properties": {"index": {"type": "integer", "minimum": 0}, "score": _NUM,
                       "text": {"type": ["string", "null"]}}}},
    "/embed": {"type": "array", "items": {"type": "array", "items": _NUM}},
    "/embed_all": {"type": "array", "items": {"type": "array", "items": {"type": "array", "items": _NUM}}},
    "/predict": {"oneOf": [{"type": "array", "items": _PREDICTION},
                           {"type": "array", "items": {"type": "array", "items": _PREDICTION}}]},
    "/similarity": {"type": "array", "items": _NUM},
    "/decode": {"type": "array", "items": {"type": "string"}},
    "/tokenize": {"type": "array", "items": {"type": "array", "items": {
        "type": "object", "required": ["id", "text", "special"],
        "properties": {"id": {"type": "integer", "minimum": 0}, "text": {"type": "string"},
                       "special": {"type": "boolean"}, "start": {"type": ["integer", "null"]},
                       "stop": {"type": ["integer", "null"]}}}}},
    "/info": {"type": "object", "required": ["model_id", "model_dtype", "model_type", "max_concurrent_requests",
                                             "max_input_length", "max_batch_tokens", "max_client_batch_size",
                                             "auto_truncate", "tokenization_workers", "version"],
              "properties": {
                  "model_id": {"type": "string"}, "model_dtype": {"type": "string"},
                  "model_sha": {"type": ["string", "null"]}, "sha": {"type": ["string", "null"]},
                  "docker_label": {"type": ["string", "null"]}, "auto_truncate": {"type": "boolean"},
                  "max_batch_requests": {"type": ["integer", "null"], "minimum": 0},
                  "max_concurrent_requests": {"type": "integer", "minimum": 0},
                  "max_input_length": {"type": "integer", "minimum": 0},
                  "max_batch_tokens": {"type": "integer", "minimum": 0},
                  "max_client_batch_size": {"type": "integer", "minimum": 0},
                  "tokenization_workers": {"type": "integer", "minimum": 0},
                  "version": {"type": "string"},
                  "model_type": {"oneOf": [
                      {"type": "object", "required": [k], "properties": {k: {
                          "type": "object", "required": ["id2label", "label2id"]}}}
                      for k in ("classifier", "reranker")
                  ] + [{"type": "object", "required": ["embedding"], "properties": {"embedding": {
                      "type": "object", "required": ["pooling"], "properties": {"pooling": {"type": "string"}}}}}]},
              }},
}


async def test_tei_shaped_answers_validate_against_tei_schemas(client: httpx.AsyncClient) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    calls = [
        ("/rerank", {"query": "q", "texts": ["a", "b"], "return_text": True}),
        ("/rerank", {"query": "q", "texts": ["a", "b"], "raw_scores": True, "truncate": None}),
        ("/embed", {"inputs": ["hello", [7592, 2088]], "truncation_direction": "Left"}),
        ("/predict", {"inputs": "a text"}),
        ("/predict", {"inputs": [["q", "d"], ["a text"]]}),
        ("/similarity", {"inputs": {"source_sentence": "a", "sentences": ["b", "c"]}}),
        ("/embed_all", {"inputs": ["hello", "a b c"], "truncate": None}),
        ("/decode", {"ids": [[7592, 2088]]}),
        ("/tokenize", {"inputs": ["hello world"]}),
    ]
    for path, body in calls:
        r = await client.post(path, json=body)
        assert r.status_code == 200, (path, r.text)
        jsonschema.validate(r.json(), TEI_SCHEMAS[path])
    jsonschema.validate((await client.get("/info")).json(), TEI_SCHEMAS["/info"])
    # /embed_all: one [tokens, D] matrix per input, the model's own token rows
    rows = (await client.post("/embed_all", json={"inputs": "hello world"})).json()
    assert len(rows) == 1 and len(rows[0]) == 4  # [CLS] hello world [SEP]
    # a cross-encoder has no token vectors: a clear 400, not a 500
    assert_error(await client.post("/embed_all", json={"inputs": ["x"], "model": "rr"}), 400)
    with pytest.raises(jsonschema.ValidationError):  # the check can fail: the native answer is not TEI's
        jsonschema.validate((await client.post("/rerank", json={"query": "q", "documents": ["a"]})).json(),
                            TEI_SCHEMAS["/rerank"])


async def test_info_has_tei_fields(client: httpx.AsyncClient) -> None:
    info = (await client.get("/info")).json()
    assert info["model_id"] == "rr"
    assert info["model_type"] == {"reranker": {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}}
    assert info["model_dtype"] == "float32" and info["max_input_length"] == 256
    for key in ("max_concurrent_requests", "max_batch_tokens", "max_client_batch_size", "tokenization_workers",
                "version", "auto_truncate"):
        assert key in info, key
    assert info["max_client_batch_size"] == 64


async def test_empty_documents_is_200(client: httpx.AsyncClient) -> None:
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        r = await client.post(path, json={"query": "q", "documents": [], "model": "rr"})
        assert r.status_code == 200, r.text
        assert r.json()["results"] == []


async def test_cohere_and_jina_shapes(client: httpx.AsyncClient) -> None:
    docs = [{"text": "Paris is in France", "title": "t1"}, "The cat"]
    r = await client.post("/v1/rerank", json={"model": "rr", "query": "France", "documents": docs,
                                        "return_documents": True, "top_n": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] and body["model"] == "rr" and "meta" in body and body["usage"]["total_tokens"] > 0
    first = body["results"][0]
    assert set(first) == {"index", "relevance_score", "document"}
    assert first["document"]["text"] in ("Paris is in France", "The cat")
    r2 = await client.post("/v2/rerank", json={"model": "rr", "query": "France", "documents": ["a", "Paris, France"]})
    assert r2.status_code == 200
    res = r2.json()["results"]
    assert [set(x) for x in res] == [{"index", "relevance_score"}] * 2
    assert res[0]["relevance_score"] >= res[1]["relevance_score"]
    assert {x["index"] for x in res} == {0, 1}


async def test_openai_embeddings_float_base64_ids_dimensions(client: httpx.AsyncClient, engine_embedder: Any) -> None:
    texts = ["hello world", "a much longer sentence about the speed of light in a vacuum"]
    expected = engine_embed(engine_embedder, texts)
    f = (await client.post("/v1/embeddings", json={"model": "emb", "input": texts})).json()
    assert f["object"] == "list" and f["model"] == "emb" and f["usage"]["prompt_tokens"] > 0
    got = np.array([d["embedding"] for d in f["data"]], dtype=np.float32)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    b = (await client.post("/v1/embeddings", json={"model": "emb", "input": texts, "encoding_format": "base64"})).json()
    decoded = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in b["data"]])
    np.testing.assert_array_equal(decoded, got)
    one = (await client.post("/v1/embeddings", json={"input": "hello world"})).json()  # default embedder
    np.testing.assert_allclose(one["data"][0]["embedding"], engine_embed(engine_embedder, texts[:1])[0], atol=1e-5)
    d = (await client.post("/v1/embeddings", json={"input": texts, "dimensions": 32})).json()
    v = np.array([x["embedding"] for x in d["data"]])
    assert v.shape == (2, 32)
    zero = (await client.post("/v1/embeddings", json={"input": texts, "dimensions": 0})).json()  # Infinity's "all"
    np.testing.assert_allclose([x["embedding"] for x in zero["data"]], expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    ids = (await client.post("/tokenize", json={"inputs": "hello world", "add_special_tokens": False, "model": "emb"})).json()
    token_ids = [t["id"] for t in ids[0]]
    by_ids = (await client.post("/v1/embeddings", json={"input": [token_ids], "model": "emb"})).json()
    np.testing.assert_allclose(by_ids["data"][0]["embedding"], one["data"][0]["embedding"], atol=1e-5)
    flat = (await client.post("/v1/embeddings", json={"input": token_ids, "model": "emb"})).json()
    np.testing.assert_allclose(flat["data"][0]["embedding"], one["data"][0]["embedding"], atol=1e-5)
    with_specials = (await client.post("/tokenize", json={"inputs": "hello world", "model": "emb"})).json()
    ids_sp = [t["id"] for t in with_specials[0]]
    sp = (await client.post("/v1/embeddings", json={"input": [ids_sp], "model": "emb"})).json()
    np.testing.assert_allclose(sp["data"][0]["embedding"], one["data"][0]["embedding"], atol=1e-5)
    # ids that the model's tokenizer never makes (here: a word's tail pieces without its head, as
    # another tokenizer's ids decode to) are refused, not embedded as garbage
    pieces = (await client.post("/tokenize", json={"inputs": "antidisestablishmentarianism", "model": "emb",
                                                  "add_special_tokens": False})).json()[0]
    assert len(pieces) > 2
    tail = [t["id"] for t in pieces[1:]]
    err = assert_error(await client.post("/v1/embeddings", json={"input": [tail], "model": "emb"}), 400)
    assert "check_embedding_ctx_length" in err["message"]


async def test_tei_routes(client: httpx.AsyncClient, engine_embedder: Any, engine_reranker: Any) -> None:
    e = await client.post("/embed", json={"inputs": ["hello world", "bye"]})
    assert e.status_code == 200
    np.testing.assert_allclose(e.json(), engine_embed(engine_embedder, ["hello world", "bye"]), atol=1e-5)
    p = await client.post("/predict", json={"inputs": ["capital of France", "Paris is in France"]})
    assert p.status_code == 200, p.text
    expected = engine_scores(engine_reranker, "capital of France", ["Paris is in France"])
    assert p.json()[0]["score"] == pytest.approx(float(expected[0]), abs=2e-5)
    pb = (await client.post("/predict", json={"inputs": [["q", "a"], ["q", "b"]]})).json()
    assert len(pb) == 2 and "label" in pb[0][0]
    t = (await client.post("/tokenize", json={"inputs": ["hello world"], "model": "rr"})).json()
    assert t[0][0]["special"] and t[0][1]["text"] == "hello" and t[0][1]["start"] == 0


async def test_operations_routes(client: httpx.AsyncClient, srv: InProcessServer) -> None:
    anonymous = srv.new_client()
    assert (await anonymous.get("/health")).json()["status"] == "ok"  # no key needed for probes
    assert (await anonymous.get("/ready")).status_code == 200
    assert (await client.post("/rerank", json={"query": "q", "documents": ["d"]})).status_code == 200
    models = (await client.get("/v1/models")).json()
    assert {m["id"] for m in models["data"]} == {"rr", "emb"}
    info = (await client.get("/info")).json()
    assert {m["name"]: m["task"] for m in info["models"]} == {"rr": "rerank", "emb": "embed"}
    assert all(m["load_seconds"] > 0 for m in info["models"])
    assert info["limits"]["max_client_batch_size"] == 64
    text = (await client.get("/metrics")).text
    for name in ("encapure_http_requests_total", "encapure_http_request_duration_seconds_bucket",
                 "encapure_http_requests_in_flight", "encapure_queue_depth_items", "encapure_batch_size_bucket",
                 "encapure_model_load_seconds", "encapure_inference_seconds_bucket"):
        assert name in text, name
    assert 'route="/rerank"' in text
    assert (await client.get("/openapi.json")).json()["paths"].keys() >= {"/rerank", "/v1/embeddings", "/v2/rerank"}
    assert (await client.get("/docs")).status_code == 200


async def test_request_id_is_honoured(client: httpx.AsyncClient) -> None:
    r = await client.post("/rerank", json={"query": "q", "documents": ["d"]}, headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    bad = await client.post("/rerank", json={"query": ""}, headers={"X-Request-ID": "req-9"})
    assert assert_error(bad, 400)["request_id"] == "req-9"


# --- errors: every status with its JSON body ----------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "kind"),
    [
        ("POST", "/rerank", {"content": b'{"query": "q", "documents": ['}, 400, "invalid_request_error"),
        ("POST", "/rerank", {"json": {"query": "q"}}, 400, "invalid_request_error"),
        ("POST", "/rerank", {"json": {"query": "q", "documents": ["d"], "top_n": "x"}}, 400, "invalid_request_error"),
        ("POST", "/rerank", {"json": {"query": "   ", "documents": ["d"]}}, 400, "invalid_request_error"),
        ("POST", "/rerank", {"content": b""}, 400, "invalid_request_error"),
        ("POST", "/rerank", {"json": {"query": "q", "documents": ["d"], "model": "emb"}}, 400, "invalid_request_error"),
        ("POST", "/v1/embeddings", {"json": {"input": "x", "model": "rr"}}, 400, "invalid_request_error"),
        ("POST", "/v1/embeddings", {"json": {"input": "x", "dimensions": 100000}}, 400, "invalid_request_error"),
        ("POST", "/v1/embeddings", {"json": {"input": [[10**9]]}}, 400, "invalid_request_error"),
        ("POST", "/embeddings", {"json": {"input": ["http://x/cat.png"], "modality": "image"}}, 400,
         "invalid_request_error"),
        ("GET", "/no/such/route", {}, 404, "not_found_error"),
        ("GET", "/rerank", {}, 405, "invalid_request_error"),
        ("POST", "/rerank", {"json": {"query": "q", "documents": ["d"] * 65}}, 413, "payload_too_large"),
        ("POST", "/rerank", {"json": {"query": "q", "documents": ["x" * 60000, "y" * 60000]}}, 413,
         "payload_too_large"),
    ],
)
async def test_error_statuses(client: httpx.AsyncClient, method: str, path: str, kwargs: dict, status: int, kind: str) -> None:
    err = assert_error(await client.request(method, path, **kwargs), status, kind)
    if status == 400 and "model" in str(kwargs.get("json", {})) and "emb" in str(kwargs.get("json", {})):
        assert "rerank" in err["message"]


async def test_wrong_task_message_says_so(client: httpx.AsyncClient) -> None:
    err = assert_error(await client.post("/rerank", json={"query": "q", "documents": ["d"], "model": "emb"}), 400)
    assert "emb" in err["message"] and "embedding" in err["message"] and "reranking" in err["message"]


async def test_401_missing_and_wrong_key(srv: InProcessServer) -> None:
    body = {"query": "q", "documents": ["d"]}
    missing = await srv.new_client().post("/rerank", json=body)
    assert "missing" in assert_error(missing, 401, "authentication_error")["message"]
    wrong = await srv.new_client({"Authorization": "Bearer nope"}).post("/rerank", json=body)
    assert_error(wrong, 401, "authentication_error")
    assert (await srv.client.post("/rerank", json=body)).status_code == 200


def test_413_streamed_body_is_cut_without_reading_it_all(tcp_server: ThreadedServer) -> None:
    """A chunked body (no Content-Length) over the limit is refused while it streams in."""
    server = tcp_server
    sent = 0

    def chunks() -> Iterator[bytes]:
        nonlocal sent
        yield b'{"query": "q", "documents": ["'
        for _ in range(2000):  # 2000 x 10 KB = 20 MB, far over the 100 KB limit
            sent += 10_000
            yield b"x" * 10_000
        yield b'"]}'

    try:
        r = httpx.post(server.url + "/rerank", content=chunks(), headers=server.headers, timeout=30)
        assert_error(r, 413, "payload_too_large")
    except httpx.HTTPError:
        # the server answered and closed the connection before the client finished sending
        assert sent < 20_000_000
    # and the server is fine afterwards
    assert httpx.get(server.url + "/ready").status_code == 200


def test_413_content_length_refused_up_front(tcp_server: ThreadedServer) -> None:
    server = tcp_server
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(
            b"POST /rerank HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: 999999999\r\n\r\n"
        )
        data = b""
        while b"payload_too_large" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    assert data.startswith(b"HTTP/1.1 413"), data[:200]
    assert b'"payload_too_large"' in data


async def test_failing_batch_fails_only_its_request(
    srv: InProcessServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A batch the runtime fails on (the stand-in fails any batch holding FAIL_WORD) is a 500 for
    its request, logged with its cause; the workers live on and later requests are served."""
    with caplog.at_level(logging.ERROR, logger="encapure"):
        r = await srv.client.post("/rerank", json={"query": "q", "documents": ["d1", f"d2 {FAIL_WORD}"]})
    err = assert_error(r, 500, "model_error")
    assert "Traceback" not in r.text
    assert any("on purpose" in rec.getMessage() for rec in caplog.records), caplog.text
    rs = await asyncio.gather(*(srv.client.post("/rerank", json={"query": "q", "documents": [f"doc {i}"]})
                                for i in range(20)))
    assert [x.status_code for x in rs] == [200] * 20
    assert (await srv.client.get("/health")).status_code == 200
    assert err["request_id"]


async def test_fault_header_is_honoured_only_with_fault_injection(models: dict[str, OnnxModel]) -> None:
    """``X-Encapure-Fault`` is a test hook: it acts with ``fault_injection`` on, never otherwise."""
    body = {"query": "q", "documents": ["d"]}
    fault = {"X-Encapure-Fault": "fail_batch"}
    async with InProcessServer(models, Settings(fault_injection=True)) as srv:
        err = assert_error(await srv.client.post("/rerank", json=body, headers=fault), 500, "model_error")
        assert "fault injection" in err["message"]
        assert (await srv.client.post("/rerank", json=body)).status_code == 200
    async with InProcessServer(models, Settings()) as srv:
        assert (await srv.client.post("/rerank", json=body, headers=fault)).status_code == 200


async def test_long_documents_window_and_error(client: httpx.AsyncClient, engine_reranker: Any) -> None:
    long_doc = " ".join(["filler words about nothing in particular"] * 80) + " Paris is the capital of France."
    docs = [long_doc, "Berlin is in Germany."]
    q = "What is the capital of France?"
    win = await client.post("/rerank", json={"query": q, "documents": docs, "long_documents": "window"})
    assert win.status_code == 200, win.text
    p = engine_reranker.prepare_pairs(q, docs, long_documents="window")
    expected = engine_reranker.finish(p, engine_reranker.forward(p.units)).scores
    np.testing.assert_allclose(win.json()["scores"], expected, atol=2e-5)
    cut = (await client.post("/rerank", json={"query": q, "documents": docs})).json()
    assert win.json()["usage"]["total_tokens"] > cut["usage"]["total_tokens"]  # every window was computed
    assert cut["usage"]["total_tokens"] <= 2 * engine_reranker.max_length
    assert_error(await client.post("/rerank", json={"query": q, "documents": docs, "long_documents": "error"}), 400)


# --- logging ------------------------------------------------------------------------------------------
def test_the_log_handler_writes_to_the_stderr_of_the_moment(monkeypatch: pytest.MonkeyPatch) -> None:
    """``serve`` sets logging up once; a ``sys.stderr`` swapped and closed since (pytest's capture
    does that after each test) must not turn every later log line into a logging error (it did:
    "Message: 'request'" from the access log of a later test). tests/conftest.py also fails any
    test during which a log handler failed."""
    import io
    import sys

    from encapure.server.logs import setup_logging

    names = ("encapure", "uvicorn", "uvicorn.error")
    saved = [(lg, lg.handlers[:], lg.level, lg.propagate) for lg in map(logging.getLogger, names)]
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    try:
        setup_logging("text", "info")
        first.close()
        second = io.StringIO()
        monkeypatch.setattr(sys, "stderr", second)
        logging.getLogger("encapure.server.access").info(
            "request", extra={"request_id": "r1", "route": "/rerank", "status": 200}
        )
        assert "request" in second.getvalue() and "status=200" in second.getvalue(), second.getvalue()
        assert "Logging error" not in second.getvalue()
    finally:
        for lg, handlers, level, propagate in saved:
            lg.handlers[:] = handlers
            lg.setLevel(level)
            lg.propagate = propagate


# --- start-up ---------------------------------------------------------------------------------------
@pytest.mark.anyio
async def test_start_up_runs_the_largest_batch_on_every_worker() -> None:
    """ONNX Runtime's arena keeps what the largest batch needed: every worker runs the largest batch
    the scheduler forms before /ready, so the RSS starts at its plateau (a soak grew +11.7%)."""
    from fakes import fake_session

    small = fake_model("rerank", name="small", max_length=128)
    long = fake_model("embed", name="long", max_length=512)
    longer = fake_model("embed", name="longer", max_length=2048)
    settings = Settings(workers=2, max_batch_tokens=2048, max_batch_size=32)
    async with InProcessServer({"small": small, "long": long, "longer": longer}, settings):
        assert fake_session(small).batches.count((16, 128)) == 2  # 2048 tokens at its max length
        assert fake_session(long).batches.count((4, 512)) == 2
        assert fake_session(longer).batches.count((4, 512)) == 2  # sequences of at most 512
    # priced over the budget (a large model): skipped; and 0 turns it off
    slow = fake_model("rerank", name="slow", max_length=128, per_token_s=1e-4)  # 16 x 128: 0.2 s
    off = fake_model("rerank", name="off", max_length=128)
    async with InProcessServer({"slow": slow}, Settings(workers=2, warmup_budget_s=0.1)):
        pass
    async with InProcessServer({"off": off}, Settings(workers=2, warmup_budget_s=0)):
        pass
    assert fake_session(slow).batches.count((1, 128)) == 1  # priced by one sequence
    # far over the budget at 64 tokens already: skipped without a full-length sequence
    big = fake_model("rerank", name="big", max_length=512, per_token_s=2e-3)  # 1 x 64: 0.13 s -> 1 x 512 ~1 s
    async with InProcessServer({"big": big}, Settings(workers=2, warmup_budget_s=0.1)):
        pass
    assert fake_session(big).batches.count((1, 64)) == 1
    assert max(w for _, w in fake_session(big).batches) < 512
    for m in (slow, off):
        assert max(n * w for n, w in fake_session(m).batches) < 1024


# --- the front door: models that need exporting -----------------------------------------------------
def test_preflight_says_what_to_install_before_listening(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """On the serving install (no torch), a model that must be exported stops the start with one
    actionable line, before the server listens; exported folders and cached exports start."""
    from conftest import RERANKER_FIXTURE, need

    from encapure.server import loading, run

    hf_folder = str(need(RERANKER_FIXTURE))
    monkeypatch.setattr(loading, "missing_export_modules", lambda: ["torch", "transformers"])
    settings = Settings(model=[f"rr={hf_folder}"], cache_dir=tmp_path)
    msg = loading.preflight(settings)
    assert msg is not None and "\n" not in msg
    assert "pip install 'encapure[export]'" in msg and "encapure export" in msg and hf_folder in msg
    assert run.serve(settings) == 2
    assert capsys.readouterr().err.strip() == msg
    exported = tmp_path / "exported"
    exported.mkdir()
    (exported / "encapure.json").write_text("{}")
    assert loading.preflight(Settings(model=[str(exported)], cache_dir=tmp_path)) is None
    cached = tmp_path / loading.cache_key(hf_folder, "int8")
    cached.mkdir()
    (cached / "encapure.json").write_text("{}")
    assert loading.preflight(settings) is None  # already exported into the cache: nothing to do
    with pytest.raises(Exception, match="pip install 'encapure\\[export\\]'"):
        loading.export_in_child(hf_folder, settings=Settings(cache_dir=tmp_path / "empty"))


@pytest.mark.slow
def test_first_serve_exports_in_a_child_process(tmp_path: Path) -> None:
    """A first start on a Hugging Face folder exports in a child process: the server never loads
    torch, and stays small at ready (the fixture: < 300 MB RSS). Without the largest-batch warm-up,
    whose ONNX Runtime arena (~150-280 MB for this model) is not what this test is about."""
    from conftest import RERANKER_FIXTURE, need

    src = need(RERANKER_FIXTURE)
    with ServerProcess(["--model", f"rr={src}", "--cache-dir", str(tmp_path), "--workers", "1",
                        "--warmup-budget", "0"],
                       ready_timeout=600) as server:
        assert server.proc is not None
        status = Path(f"/proc/{server.proc.pid}/status").read_text()
        rss_mb = int(next(ln for ln in status.splitlines() if ln.startswith("VmRSS")).split()[1]) / 1024
        maps = Path(f"/proc/{server.proc.pid}/maps").read_text()
        r = httpx.post(server.url + "/rerank", json={"query": "q", "documents": ["d"]}, timeout=60)
        log = server.log_text()
    assert r.status_code == 200, r.text
    assert "libtorch" not in maps, "torch was loaded by the serving process"
    assert "in a child process" in log
    assert any(p.name.endswith("int8") or "--int8--" in p.name for p in tmp_path.iterdir())
    print(f"RSS at ready after a first (child) export: {rss_mb:.0f} MB")
    assert rss_mb < 300, rss_mb

"""The HTTP service as users see it: a real `encapure serve` process on 127.0.0.1.

One server per module (a reranker and an embedder in fp32, so batched-vs-alone parity can be
exact: int8 dynamic quantization makes results depend on the batch's other rows), with an API key and fault injection on.
"""

from __future__ import annotations

import asyncio
import base64
import random
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from encapure.server.testing import ServerProcess

KEY = "test-key"
WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "paris", "france", "capital", "river", "bank", "money", "loan", "interest", "rate", "neural", "network", "model", "token", "embedding", "search", "query", "document", "answer", "question", "light", "speed", "physics", "energy", "matter"]


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def server(reranker_fp32_dir: Path, embedder_fp32_dir: Path) -> Iterator[ServerProcess]:
    srv = ServerProcess(
        [
            "--model", f"rr={reranker_fp32_dir}",
            "--model", f"emb={embedder_fp32_dir}",
            "--max-request-bytes", "100000",
            "--max-client-batch-size", "64",
            # the shared test machine can be slow; deadlines have their own test
            "--request-timeout", "300",
        ],
        env={"ENCAPURE_FAULT_INJECTION": "1"},
        api_key=KEY,
    )
    with srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def engine_reranker(reranker_fp32_dir: Path) -> Any:
    from encapure.engine import load_model

    return load_model(reranker_fp32_dir, name="rr")


@pytest.fixture(scope="module")
def engine_embedder(embedder_fp32_dir: Path) -> Any:
    from encapure.engine import load_model

    return load_model(embedder_fp32_dir, name="emb")


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


# --- concurrency and correctness ----------------------------------------------------------------
@pytest.mark.slow
def test_100_concurrent_reranks_equal_engine_alone(server: ServerProcess, engine_reranker: Any) -> None:
    rng = random.Random(7)
    requests = []
    for i in range(100):
        n_docs = rng.choice([1, 2, 3, 5, 8, 12])
        docs = [sentence(rng, rng.randint(2, 40)) for _ in range(n_docs)]
        requests.append({"query": sentence(rng, rng.randint(2, 12)), "documents": docs, "top_n": 1 + i % 5})

    async def go() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
        async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=120, limits=limits) as c:
            return await asyncio.gather(*(c.post("/rerank", json=body) for body in requests))

    responses = asyncio.run(go())
    assert [r.status_code for r in responses] == [200] * 100, [r.text for r in responses if r.status_code != 200][:3]
    for body, r in zip(requests, responses, strict=True):
        got = r.json()
        expected = engine_scores(engine_reranker, body["query"], body["documents"])
        np.testing.assert_allclose(got["scores"], expected, rtol=0, atol=2e-5)
        order = np.argsort(-np.asarray(got["scores"]), kind="stable")[: body["top_n"]]
        assert [x["index"] for x in got["results"]] == order.tolist()
        assert got["model"] == "rr"
        assert got["usage"]["total_tokens"] > 0
    # the scheduler really batched across requests
    metrics = httpx.get(server.url + "/metrics", headers=server.headers).text
    values = {}
    for line in metrics.splitlines():
        if line.startswith("encapure_batch_requests_") and 'model="rr"' in line:
            key, _, value = line.rpartition(" ")
            values[key] = float(value)
    single = next(v for k, v in values.items() if k.startswith("encapure_batch_requests_bucket") and 'le="1.0"' in k)
    total = next(v for k, v in values.items() if k.startswith("encapure_batch_requests_count"))
    assert total > single, (total, single)  # some batch carried units of several requests


# --- routes and shapes -------------------------------------------------------------------------------
def test_native_rerank_aliases_and_documents(client: httpx.Client, engine_reranker: Any) -> None:
    docs = ["Paris is the capital of France.", {"text": "The cat sat on the mat.", "id": "d2"}, "Berlin."]
    r = client.post(
        "/rerank",
        json={"query": "capital of France", "texts": docs, "top_k": 2, "return_text": True},
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
    assert all(0.0 <= s <= 1.0 for s in body["scores"])
    for h in ("x-request-id", "x-queue-time", "x-inference-time", "x-total-time", "x-total-tokens"):
        assert h in r.headers
    assert int(r.headers["x-total-tokens"]) == body["usage"]["total_tokens"]

    raw = client.post("/rerank", json={"query": "capital of France", "documents": texts, "raw_scores": True}).json()
    np.testing.assert_allclose(raw["scores"], engine_scores(engine_reranker, "capital of France", texts, raw=True),
                               atol=2e-4)


def test_empty_documents_is_200(client: httpx.Client) -> None:
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        r = client.post(path, json={"query": "q", "documents": [], "model": "rr"})
        assert r.status_code == 200, r.text
        assert r.json()["results"] == []


def test_cohere_and_jina_shapes(client: httpx.Client) -> None:
    docs = [{"text": "Paris is in France", "title": "t1"}, "The cat"]
    r = client.post("/v1/rerank", json={"model": "rr", "query": "France", "documents": docs,
                                        "return_documents": True, "top_n": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] and body["model"] == "rr" and "meta" in body and body["usage"]["total_tokens"] > 0
    first = body["results"][0]
    assert set(first) == {"index", "relevance_score", "document"}
    assert first["document"]["text"] in ("Paris is in France", "The cat")
    r2 = client.post("/v2/rerank", json={"model": "rr", "query": "France", "documents": ["a", "Paris, France"]})
    assert r2.status_code == 200
    res = r2.json()["results"]
    assert [set(x) for x in res] == [{"index", "relevance_score"}] * 2
    assert res[0]["relevance_score"] >= res[1]["relevance_score"]
    assert {x["index"] for x in res} == {0, 1}


def test_openai_embeddings_float_base64_ids_dimensions(client: httpx.Client, engine_embedder: Any) -> None:
    texts = ["hello world", "a much longer sentence about the speed of light in a vacuum"]
    expected = engine_embed(engine_embedder, texts)
    f = client.post("/v1/embeddings", json={"model": "emb", "input": texts}).json()
    assert f["object"] == "list" and f["model"] == "emb" and f["usage"]["prompt_tokens"] > 0
    got = np.array([d["embedding"] for d in f["data"]], dtype=np.float32)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    b = client.post("/v1/embeddings", json={"model": "emb", "input": texts, "encoding_format": "base64"}).json()
    decoded = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in b["data"]])
    np.testing.assert_array_equal(decoded, got)
    one = client.post("/v1/embeddings", json={"input": "hello world"}).json()  # default embedder
    np.testing.assert_allclose(one["data"][0]["embedding"], engine_embed(engine_embedder, texts[:1])[0], atol=1e-5)
    d = client.post("/v1/embeddings", json={"input": texts, "dimensions": 32}).json()
    v = np.array([x["embedding"] for x in d["data"]])
    assert v.shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    ids = client.post("/tokenize", json={"inputs": "hello world", "add_special_tokens": False, "model": "emb"}).json()
    token_ids = [t["id"] for t in ids[0]]
    by_ids = client.post("/v1/embeddings", json={"input": [token_ids], "model": "emb"}).json()
    np.testing.assert_allclose(by_ids["data"][0]["embedding"], one["data"][0]["embedding"], atol=1e-5)
    flat = client.post("/v1/embeddings", json={"input": token_ids, "model": "emb"}).json()
    np.testing.assert_allclose(flat["data"][0]["embedding"], one["data"][0]["embedding"], atol=1e-5)


def test_tei_routes(client: httpx.Client, engine_embedder: Any, engine_reranker: Any) -> None:
    e = client.post("/embed", json={"inputs": ["hello world", "bye"]})
    assert e.status_code == 200
    np.testing.assert_allclose(e.json(), engine_embed(engine_embedder, ["hello world", "bye"]), atol=1e-5)
    p = client.post("/predict", json={"inputs": ["capital of France", "Paris is in France"]})
    assert p.status_code == 200, p.text
    expected = engine_scores(engine_reranker, "capital of France", ["Paris is in France"])
    assert p.json()[0]["score"] == pytest.approx(float(expected[0]), abs=2e-5)
    pb = client.post("/predict", json={"inputs": [["q", "a"], ["q", "b"]]}).json()
    assert len(pb) == 2 and "label" in pb[0][0]
    t = client.post("/tokenize", json={"inputs": ["hello world"], "model": "rr"}).json()
    assert t[0][0]["special"] and t[0][1]["text"] == "hello" and t[0][1]["start"] == 0


def test_operations_routes(client: httpx.Client, server: ServerProcess) -> None:
    assert httpx.get(server.url + "/health").json()["status"] == "ok"  # no key needed for probes
    assert httpx.get(server.url + "/ready").status_code == 200
    models = client.get("/v1/models").json()
    assert {m["id"] for m in models["data"]} == {"rr", "emb"}
    info = client.get("/info").json()
    assert {m["name"]: m["task"] for m in info["models"]} == {"rr": "rerank", "emb": "embed"}
    assert all(m["load_seconds"] > 0 for m in info["models"])
    assert info["limits"]["max_client_batch_size"] == 64
    text = client.get("/metrics").text
    for name in ("encapure_http_requests_total", "encapure_http_request_duration_seconds_bucket",
                 "encapure_http_requests_in_flight", "encapure_queue_depth_items", "encapure_batch_size_bucket",
                 "encapure_model_load_seconds", "encapure_inference_seconds_bucket"):
        assert name in text, name
    assert 'route="/rerank"' in text
    assert client.get("/openapi.json").json()["paths"].keys() >= {"/rerank", "/v1/embeddings", "/v2/rerank"}
    assert client.get("/docs").status_code == 200


def test_request_id_is_honoured(client: httpx.Client) -> None:
    r = client.post("/rerank", json={"query": "q", "documents": ["d"]}, headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    bad = client.post("/rerank", json={"query": ""}, headers={"X-Request-ID": "req-9"})
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
        ("POST", "/rerank", {"json": {"query": "q", "documents": ["d"], "model": "nope"}}, 404, "not_found_error"),
        ("GET", "/no/such/route", {}, 404, "not_found_error"),
        ("GET", "/rerank", {}, 405, "invalid_request_error"),
        ("POST", "/rerank", {"json": {"query": "q", "documents": ["d"] * 65}}, 413, "payload_too_large"),
        ("POST", "/rerank", {"json": {"query": "q", "documents": ["x" * 60000, "y" * 60000]}}, 413,
         "payload_too_large"),
    ],
)
def test_error_statuses(client: httpx.Client, method: str, path: str, kwargs: dict, status: int, kind: str) -> None:
    err = assert_error(client.request(method, path, **kwargs), status, kind)
    if status == 400 and "model" in str(kwargs.get("json", {})) and "emb" in str(kwargs.get("json", {})):
        assert "rerank" in err["message"]


def test_wrong_task_message_says_so(client: httpx.Client) -> None:
    err = assert_error(client.post("/rerank", json={"query": "q", "documents": ["d"], "model": "emb"}), 400)
    assert "emb" in err["message"] and "embedding" in err["message"] and "reranking" in err["message"]


def test_401_missing_and_wrong_key(server: ServerProcess) -> None:
    body = {"query": "q", "documents": ["d"]}
    assert "missing" in assert_error(httpx.post(server.url + "/rerank", json=body), 401, "authentication_error")[
        "message"
    ]
    wrong = httpx.post(server.url + "/rerank", json=body, headers={"Authorization": "Bearer nope"})
    assert_error(wrong, 401, "authentication_error")


def test_413_streamed_body_is_cut_without_reading_it_all(server: ServerProcess) -> None:
    """A chunked body (no Content-Length) over the limit is refused while it streams in."""
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


def test_413_content_length_refused_up_front(server: ServerProcess) -> None:
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


def test_injected_failing_batch_fails_only_its_request(client: httpx.Client, server: ServerProcess) -> None:
    r = client.post("/rerank", json={"query": "q", "documents": ["d1", "d2"]}, headers={"X-Encapure-Fault": "fail_batch"})
    err = assert_error(r, 500, "model_error")
    assert "Traceback" not in r.text
    assert "fault injection" in server.log_text()

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=60) as c:
            rs = await asyncio.gather(*(c.post("/rerank", json={"query": "q", "documents": [f"doc {i}"]})
                                        for i in range(20)))
            return [x.status_code for x in rs]

    assert asyncio.run(burst()) == [200] * 20
    assert httpx.get(server.url + "/health").status_code == 200
    assert err["request_id"]


def test_long_documents_window_and_error(client: httpx.Client, engine_reranker: Any) -> None:
    long_doc = " ".join(["filler words about nothing in particular"] * 80) + " Paris is the capital of France."
    docs = [long_doc, "Berlin is in Germany."]
    q = "What is the capital of France?"
    win = client.post("/rerank", json={"query": q, "documents": docs, "long_documents": "window"})
    assert win.status_code == 200, win.text
    p = engine_reranker.prepare_pairs(q, docs, long_documents="window")
    expected = engine_reranker.finish(p, engine_reranker.forward(p.units)).scores
    np.testing.assert_allclose(win.json()["scores"], expected, atol=2e-5)
    cut = client.post("/rerank", json={"query": q, "documents": docs}).json()
    assert win.json()["usage"]["total_tokens"] > cut["usage"]["total_tokens"]  # every window was computed
    assert cut["usage"]["total_tokens"] <= 2 * engine_reranker.max_length
    assert_error(client.post("/rerank", json={"query": q, "documents": docs, "long_documents": "error"}), 400)

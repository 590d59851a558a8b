"""The HTTP side of issue 10: what a hostile or careless client sends must never turn into a 500,
a plain-text answer, a hung socket or an untruthful OpenAPI document.

- lone UTF-16 surrogates in any string of any POST route: 400 before any work;
- every error is our JSON (404/405 from the router, malformed JSON, uvicorn's own 400);
- a drain that outlasts ``--shutdown-timeout`` answers what is still running with JSON 503;
- header and body read timeouts (408, connection closed), slow clients that leave count as 499;
- the OpenAPI document lists what each route really answers, checked by schemathesis;
- ``encapure_http_errors_total{type}`` and zero-initialized rejection series.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from fakes import fake_model, fake_session

from encapure.server.testing import InProcessServer
from encapure.settings import Settings

S = "\\ud800"  # a lone surrogate, as the JSON escape a client sends (raw text, not a Python str)
LOW = "\\udfff"

# (route, raw JSON body): each puts a lone surrogate in a different string field.
SURROGATE_BODIES: list[tuple[str, str]] = [
    ("/rerank", f'{{"query": "{S}", "documents": ["a"]}}'),
    ("/rerank", f'{{"query": "q", "documents": ["a", "b{S}c"]}}'),
    ("/rerank", f'{{"query": "q", "documents": [{{"text": "a{LOW}"}}]}}'),
    ("/rerank", f'{{"query": "q", "documents": [{{"text": "a", "meta": {{"k": "{S}"}}}}], "return_documents": true}}'),
    ("/rerank", f'{{"query": "q", "texts": ["a", "{S}"]}}'),
    ("/rerank", f'{{"query": "q", "documents": ["a"], "model": "rr{S}"}}'),
    ("/v1/rerank", f'{{"query": "q", "documents": [{{"title": "{S}", "text": "t"}}], "rank_fields": ["title"]}}'),
    ("/v1/rerank", f'{{"query": "q", "documents": ["a"], "rank_fields": ["{S}"]}}'),
    ("/v2/rerank", f'{{"query": "q", "documents": [{{"text": "t", "id": "{S}"}}], "return_documents": true}}'),
    ("/v1/embeddings", f'{{"input": "{S}"}}'),
    ("/v1/embeddings", f'{{"input": ["ok", "{S}"], "user": "u"}}'),
    ("/v1/embeddings", f'{{"input": "ok", "user": "{S}"}}'),
    ("/embeddings", f'{{"input": ["x{S}"]}}'),
    ("/embed", f'{{"inputs": "{S}"}}'),
    ("/embed", f'{{"inputs": ["ok"], "prompt_name": "{S}"}}'),
    ("/predict", f'{{"inputs": ["{S}", "b"]}}'),
    ("/predict", f'{{"inputs": [["a", "{S}"]]}}'),
    ("/tokenize", f'{{"inputs": "{S}"}}'),
    ("/tokenize", f'{{"inputs": ["ok"], "model": "{S}"}}'),
    ("/decode", f'{{"ids": [101, 102], "model": "{S}"}}'),
    ("/similarity", f'{{"inputs": {{"source_sentence": "{S}", "sentences": ["a"]}}}}'),
    ("/similarity", f'{{"inputs": {{"source_sentence": "a", "sentences": ["a"]}}, "parameters": {{"prompt_name": "{S}"}}}}'),
    ("/", f'{{"inputs": "{S}"}}'),
    ("/invocations", f'{{"query": "q", "texts": ["{S}"]}}'),
]


@pytest.fixture
async def inproc() -> AsyncIterator[InProcessServer]:
    models = {"rr": fake_model("rerank", name="rr"), "emb": fake_model("embed", name="emb")}
    async with InProcessServer(models, Settings(workers=1, max_wait_ms=1)) as srv:
        yield srv


def batches_run(srv: InProcessServer) -> int:
    return sum(len(fake_session(m).batches) for m in srv.state.models.values())  # type: ignore[arg-type]


@pytest.mark.anyio
@pytest.mark.parametrize(("route", "body"), SURROGATE_BODIES, ids=[f"{r}:{i}" for i, (r, _) in enumerate(SURROGATE_BODIES)])
async def test_lone_surrogates_are_a_400_before_any_work(inproc: InProcessServer, route: str, body: str) -> None:
    before = batches_run(inproc)
    r = await inproc.client.post(route, content=body.encode(), headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert "surrogate" in err["message"]
    assert batches_run(inproc) == before  # refused before any tokenization or inference


@pytest.mark.anyio
async def test_raw_surrogate_bytes_and_valid_pairs(inproc: InProcessServer) -> None:
    raw = b'{"query": "q", "documents": ["\xed\xa0\x80"]}'  # a surrogate encoded as (invalid) UTF-8
    r = await inproc.client.post("/rerank", content=raw)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text
    # a proper pair is one character (U+1F600): accepted, and echoed back as that character
    pair = b'{"query": "q", "documents": [{"text": "smile \\ud83d\\ude00"}], "return_documents": true}'
    r = await inproc.client.post("/rerank", content=pair)
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["document"]["text"] == "smile \U0001f600"

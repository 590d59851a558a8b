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

import asyncio
import functools
import json
import re
import signal
import socket
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from fakes import fake_model, fake_session

from encapure.server.testing import InProcessServer, ServerProcess, ThreadedServer
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
    ("/embed_all", f'{{"inputs": ["ok", "{S}"]}}'),
    ("/embed_multivector", f'{{"input": ["{S}"], "kind": "query"}}'),
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


# --- every answer is our JSON --------------------------------------------------------------------
@pytest.mark.anyio
async def test_router_errors_and_malformed_json_are_our_json(inproc: InProcessServer) -> None:
    c = inproc.client
    r = await c.get("/no/such/route")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = await c.delete("/rerank")
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"
    assert r.headers["allow"] == "POST"
    r = await c.put("/")  # GET / and POST / are two routes: Allow names both
    assert r.status_code == 405 and set(r.headers["allow"].split(", ")) == {"GET", "POST"}
    for route in ("/rerank", "/embed", "/", "/tokenize"):
        r = await c.post(route, content=b'{"query": "q", "documents": [')
        assert r.status_code == 400, (route, r.text)
        assert r.headers["content-type"] == "application/json"
        assert r.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.anyio
async def test_401_says_bearer() -> None:
    async with InProcessServer({"rr": fake_model("rerank", name="rr")}, Settings(api_key="k", workers=1)) as srv:
        anon = srv.new_client()
        r = await anon.post("/rerank", json={"query": "q", "documents": ["a"]})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["type"] == "authentication_error"


# --- metrics ---------------------------------------------------------------------------------------
def metric(text: str, name: str, **labels: str) -> float | None:
    """The sum of a metric's samples with these labels; None when no such series exists."""
    found = None
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:]+)(\{[^}]*\})?\s+(\S+)$", line)
        if not m or m.group(1) != name:
            continue
        if all(f'{k}="{v}"' in (m.group(2) or "") for k, v in labels.items()):
            found = (found or 0.0) + float(m.group(3))
    return found


@pytest.mark.anyio
async def test_error_counter_by_type_and_zero_series(inproc: InProcessServer) -> None:
    text = (await inproc.client.get("/metrics")).text
    for kind in ("invalid_request_error", "overloaded_error", "deadline_exceeded", "request_timeout"):
        assert metric(text, "encapure_http_errors_total", type=kind) == 0.0, kind
    for reason in ("overloaded", "shutting_down", "worker_died"):
        assert metric(text, "encapure_rejected_requests_total", reason=reason) == 0.0, reason
    await inproc.client.post("/rerank", content=b"{")
    await inproc.client.get("/nope")
    text = (await inproc.client.get("/metrics")).text
    assert metric(text, "encapure_http_errors_total", type="invalid_request_error") == 1.0
    assert metric(text, "encapure_http_errors_total", type="not_found_error") == 1.0


@pytest.mark.anyio
async def test_deadline_503_is_counted_as_an_error() -> None:
    model = fake_model("rerank", name="rr", stall_s=0.5)
    settings = Settings(workers=1, request_timeout_s=0.3, max_wait_ms=1)
    async with InProcessServer({"rr": model}, settings) as srv:
        r = await srv.client.post("/rerank", json={"query": "q", "documents": ["stall stall"]})
        assert r.status_code == 503 and r.json()["error"]["type"] == "deadline_exceeded", r.text
        text = (await srv.client.get("/metrics")).text
        assert metric(text, "encapure_http_errors_total", type="deadline_exceeded") == 1.0


# --- slow clients: header and body read timeouts, 499 for those that leave ------------------------
TIMEOUT_S = 0.5


@pytest.fixture(scope="module")
def threaded() -> Iterator[ThreadedServer]:
    settings = Settings(workers=1, max_wait_ms=1, header_timeout_s=TIMEOUT_S, body_timeout_s=TIMEOUT_S)
    with ThreadedServer({"rr": fake_model("rerank", name="rr")}, settings) as srv:
        yield srv


def connect(srv: ThreadedServer) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    return s


def read_all(s: socket.socket, limit_s: float = 5.0) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when it closed it."""
    t0 = time.monotonic()
    s.settimeout(limit_s)
    chunks = []
    while True:
        data = s.recv(65536)
        if not data:
            return b"".join(chunks), time.monotonic() - t0
        chunks.append(data)


def status_and_json(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), raw
    return int(head.split(b" ", 2)[1]), json.loads(body)


def test_slow_headers_get_408_and_the_connection_closes(threaded: ThreadedServer) -> None:
    s = connect(threaded)
    s.sendall(b"POST /rerank HTTP/1.1\r\nHost: x\r\n")  # and never the rest
    raw, waited = read_all(s)
    status, body = status_and_json(raw)
    assert status == 408 and body["error"]["type"] == "request_timeout"
    assert waited < TIMEOUT_S + 2


def test_slow_body_gets_408_and_a_client_that_leaves_is_a_499(threaded: ThreadedServer) -> None:
    s = connect(threaded)
    s.sendall(b"POST /rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"q")
    raw, waited = read_all(s)
    status, body = status_and_json(raw)
    assert status == 408 and body["error"]["type"] == "request_timeout", body
    assert waited < TIMEOUT_S + 2

    def count(kind: str) -> float:
        return metric(httpx.get(threaded.url + "/metrics").text, "encapure_http_errors_total", type=kind) or 0.0

    def count499() -> float:
        text = httpx.get(threaded.url + "/metrics").text
        return metric(text, "encapure_http_requests_total", route="/rerank", status="499") or 0.0

    before, before_400 = count499(), count("invalid_request_error")
    s = connect(threaded)
    s.sendall(b"POST /rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"q")
    time.sleep(0.1)
    s.close()  # the client gives up half-way through its body
    end = time.monotonic() + 5
    while count499() == before and time.monotonic() < end:
        time.sleep(0.05)
    assert count499() == before + 1
    assert count("invalid_request_error") == before_400  # not logged as the client's 400


def test_slowloris_sockets_are_all_closed(threaded: ThreadedServer) -> None:
    socks = [connect(threaded) for _ in range(200)]
    for i, s in enumerate(socks):
        s.sendall(b"GET /health HTTP/1.1\r\n" if i % 2 else b"")  # half say nothing at all
    t0 = time.monotonic()
    for s in socks:
        read_all(s, limit_s=TIMEOUT_S + 5)
        s.close()
    assert time.monotonic() - t0 < TIMEOUT_S + 5
    assert httpx.get(threaded.url + "/health").status_code == 200  # and the server still answers


def test_unparseable_http_is_a_json_400(threaded: ThreadedServer) -> None:
    s = connect(threaded)
    s.sendall(b"NOT HTTP AT ALL\x00\x01\r\n\r\n")
    raw, _ = read_all(s)
    status, body = status_and_json(raw)
    assert status == 400 and body["error"]["type"] == "invalid_request_error"


# --- overload: refused before the body is read, on a connection that stays usable -------------------
def read_response(s: socket.socket, limit_s: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """One HTTP response from a keep-alive connection: status, headers, body."""
    s.settimeout(limit_s)
    raw = b""
    while b"\r\n\r\n" not in raw:
        chunk = s.recv(65536)
        assert chunk, f"connection closed after {raw!r}"
        raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict((k.lower(), v.strip()) for k, v in (line.split(":", 1) for line in lines[1:]))
    while len(body) < int(headers["content-length"]):
        chunk = s.recv(65536)
        assert chunk, "connection closed mid-body"
        body += chunk
    return int(lines[0].split(" ", 2)[1]), headers, body


@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_a_saturated_server_refuses_before_reading_the_body(parser: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """While admitted work is beyond what drains in time, an inference request is refused 503
    overloaded_error at once from its headers: its body is never awaited (one that never arrives
    still gets its answer well within --body-timeout), so it is never parsed nor tokenized; the
    refusal is counted like any other. The connection stays usable: the body that comes after the
    answer is discarded, then the socket idles under the keep-alive timeout (not a stale 408 at
    --header-timeout), and the next request on it is served. Under both of uvicorn's parsers."""
    if parser == "h11":
        from encapure.server import protocol

        monkeypatch.setattr(protocol, "_Fast", None)
    settings = Settings(workers=1, max_wait_ms=1, body_timeout_s=5.0, header_timeout_s=TIMEOUT_S,
                        keep_alive_timeout_s=30.0)
    with ThreadedServer({"rr": fake_model("rerank", name="rr")}, settings) as srv:
        sched = srv.state.scheduler
        assert sched is not None and sched._loop is not None
        loop, adm = sched._loop, sched.admission
        before = httpx.get(srv.url + "/metrics").text
        # what a burst leaves behind: admitted work far beyond what drains within the deadline
        huge = adm.throughput * settings.request_timeout_s * 10
        ticket = asyncio.run_coroutine_threadsafe(adm.admit(1, huge, time.monotonic() + 60), loop).result(5)
        s = connect(srv)
        try:
            t0 = time.monotonic()
            s.sendall(b"POST /rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"X-Request-Id: storm-1\r\nContent-Length: 1000\r\n\r\n")  # and no body yet
            status, headers, body = read_response(s)
            waited = time.monotonic() - t0
            assert status == 503, body
            assert waited < 1.0, waited  # not after the 5 s body timeout: the body was never awaited
            assert json.loads(body) == {"error": {"type": "overloaded_error", "message": json.loads(body)["error"]["message"],
                                                  "request_id": "storm-1"}}
            assert headers["content-type"] == "application/json" and int(headers["retry-after"]) >= 1
            assert headers["x-request-id"] == "storm-1"
            # /health and the other GET routes are not gated
            assert httpx.get(srv.url + "/health").status_code == 200
            # a refused client that never finishes its body is closed at the header timeout, silently
            s2 = connect(srv)
            s2.sendall(b"POST /rerank HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
            assert read_response(s2)[0] == 503
            s2.sendall(b"x" * 10)
            rest, closed_after = read_all(s2, limit_s=TIMEOUT_S + 3)
            assert rest == b"" and closed_after < TIMEOUT_S + 2, (rest, closed_after)
            s2.close()
        finally:
            loop.call_soon_threadsafe(functools.partial(adm.release, ticket, claimed=False))
        after = httpx.get(srv.url + "/metrics").text
        for name, labels in (("encapure_http_requests_total", {"route": "/rerank", "status": "503"}),
                             ("encapure_http_errors_total", {"type": "overloaded_error"}),
                             ("encapure_rejected_requests_total", {"reason": "overloaded"})):
            assert (metric(after, name, **labels) or 0) == (metric(before, name, **labels) or 0) + 2, name
        s.sendall(b"x" * 600)  # the body it had promised arrives after the answer, in two parts
        time.sleep(0.1)
        s.sendall(b"x" * 400)
        time.sleep(TIMEOUT_S + 0.5)  # idle past the header timeout: nothing may be sent, nothing closed
        s.settimeout(0.2)
        with pytest.raises(TimeoutError):
            s.recv(1)
        req = b'{"query": "q", "documents": ["a", "b"]}'
        s.sendall(b"POST /rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(req), req))
        status, _, body = read_response(s)
        assert status == 200 and len(json.loads(body)["results"]) == 2, body
        s.close()


def test_keep_alive_outlasts_the_longest_retry_after() -> None:
    """A client that waits out Retry-After finds its keep-alive connection still open (uvicorn's
    5 s closed it under the 9-15 s Retry-After of an overload run: 1-3 client errors a run)."""
    from encapure.scheduler.admission import RETRY_AFTER_MAX_S
    from encapure.server.run import uvicorn_config
    from encapure.server.state import ServerState

    assert Settings().keep_alive_timeout_s > RETRY_AFTER_MAX_S
    settings = Settings(keep_alive_timeout_s=7.5)
    assert uvicorn_config(object(), ServerState(settings)).timeout_keep_alive == 7.5


# --- drain: what outlasts --shutdown-timeout is answered JSON 503 ----------------------------------
def test_requests_cut_off_by_the_drain_timeout_get_json_503(reranker_int8_dir: object) -> None:
    args = ["--model", f"rr={reranker_int8_dir}", "--workers", "2", "--shutdown-timeout", "1"]
    with ServerProcess(args, env={"ENCAPURE_FAULT_INJECTION": "true"}) as srv:

        async def go() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
                slow = [
                    asyncio.ensure_future(
                        c.post(
                            "/rerank",
                            json={"query": "q", "documents": [f"doc {i}"]},
                            headers={"x-encapure-fault": "slow:6000"},
                        )
                    )
                    for i in range(4)
                ]
                await asyncio.sleep(0.5)  # all four are in flight
                srv.signal(signal.SIGTERM)
                return list(await asyncio.gather(*slow))

        t0 = time.monotonic()
        answers = asyncio.run(go())
        waited = time.monotonic() - t0
        for r in answers:
            assert r.status_code == 503, r.text
            assert r.headers["content-type"] == "application/json"
            assert r.json()["error"]["type"] == "shutting_down"
        assert waited < 5  # answered at the drain timeout, not when the work would have ended
        assert srv.wait(30) == 0
        assert "Internal Server Error" not in srv.log_text()


# --- a truthful OpenAPI document ---------------------------------------------------------------------
@pytest.mark.anyio
async def test_openapi_lists_what_routes_really_answer() -> None:
    models = {"rr": fake_model("rerank", name="rr")}
    async with InProcessServer(models, Settings(api_key="k", workers=1)) as srv:
        doc = (await srv.new_client().get("/openapi.json")).json()
        assert "bearerAuth" in doc["components"]["securitySchemes"]
        assert "HTTPValidationError" not in doc["components"]["schemas"]
        ops = [(p, m, op) for p, item in doc["paths"].items() for m, op in item.items()]
        assert ("/embed" not in doc["paths"]) and ("/rerank" in doc["paths"])  # no embedder loaded
        for path, method, op in ops:
            responses = op["responses"]
            assert "422" not in responses, (path, method)
            ok = responses["200"]["content"]
            schema = next(iter(ok.values()))["schema"]
            assert schema not in ({}, None), (path, method)  # a real response model
            for status in ("500",) + (("400", "413", "503") if method == "post" else ()):
                ref = responses[status]["content"]["application/json"]["schema"]["$ref"]
                assert ref.endswith("/ErrorResponse"), (path, method, status)
            if path in ("/health", "/ready", "/ping", "/docs", "/openapi.json"):
                assert op["security"] == [] and "401" not in responses
            else:
                assert "WWW-Authenticate" in responses["401"]["headers"], (path, method)
        assert list(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
        assert {"get", "head"} <= set(doc["paths"]["/health"]) and {"get", "head"} <= set(doc["paths"]["/ready"])
        ids = doc["components"]["schemas"]["TEIDecodeRequest"]["properties"]["ids"]
        assert str(srv.state.models["rr"].vocab_size - 1) in json.dumps(ids)  # ids bounded by the vocabulary

        anon = srv.new_client()
        for path in ("/health", "/ready"):
            r = await anon.head(path)
            assert r.status_code == 200 and r.content == b""
        r = await srv.client.get("/metrics")
        assert r.headers["content-type"].startswith("text/plain")


def test_schemathesis_finds_nothing(reranker_int8_dir: object, tmp_path: object) -> None:
    """Every check schemathesis has, over the whole served document, against a real server.
    A small example count keeps it well under a minute; `make reliability` runs >= 50 per operation."""
    pytest.importorskip("schemathesis")
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    cli = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or shutil.which("schemathesis")
    assert cli is not None
    config = Path(__file__).resolve().parents[1] / "scripts" / "schemathesis.toml"
    with ServerProcess(["--model", f"rr={reranker_int8_dir}", "--workers", "1"], api_key="k") as srv:
        run = subprocess.run(
            [cli, "--config-file", str(config), "run", srv.url + "/openapi.json", "--checks", "all",
             "--max-examples", "8", "--workers", "1", "--no-color", "-H", "Authorization: Bearer k",
             "--seed", "1"],
            capture_output=True, text=True, timeout=300, cwd=str(tmp_path),  # its cache dir goes there
        )
        assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
        assert "No issues found" in run.stdout
        assert "Internal Server Error" not in srv.log_text()

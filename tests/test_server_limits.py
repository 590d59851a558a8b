"""Saturation, deadlines and disconnected clients against a server with tiny capacity.

One inference worker, room for 2 requests, 0.3 s admission timeout, 2 s request deadline. The
server is uvicorn in a thread (real sockets, so a client that hangs up is a real disconnect) over
a stand-in reranker (``tests/fakes.py``) whose batch takes STALL_S longer for each STALL_WORD in
it: a slow request on demand, without an export or fault injection.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator

import httpx
import pytest
from fakes import STALL_WORD, fake_model

from encapure.server.testing import ThreadedServer
from encapure.settings import Settings

ADMISSION_S = 0.3
DEADLINE_S = 2.0
STALL_S = 0.1


def slow_doc(seconds: float) -> str:
    """A document whose batch takes ``seconds`` longer on the stand-in model."""
    return " ".join([STALL_WORD] * round(seconds / STALL_S))


@pytest.fixture(scope="module")
def server() -> Iterator[ThreadedServer]:
    settings = Settings(
        workers=1,
        max_concurrent_requests=2,
        max_queued_items=16,
        admission_timeout_s=ADMISSION_S,
        request_timeout_s=DEADLINE_S,
        max_wait_ms=1,
    )
    model = fake_model("rerank", name="rr", base_s=0.002, per_token_s=1e-6, stall_s=STALL_S)
    with ThreadedServer({"rr": model}, settings) as srv:
        yield srv


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        m = re.match(r"^([a-zA-Z_:]+)(\{[^}]*\})?\s+(\S+)$", line)
        if not m or m.group(1) != name:
            continue
        lab = m.group(2) or ""
        if all(f'{k}="{v}"' in lab for k, v in labels.items()):
            total += float(m.group(3))
    return total


def normal_request(server: ThreadedServer) -> httpx.Response:
    return httpx.post(server.url + "/rerank", json={"query": "q", "documents": ["a", "b"]}, timeout=30)


def test_saturation_gives_503_with_retry_after_fast_and_recovers(server: ThreadedServer) -> None:
    async def go() -> tuple[httpx.Response, list[tuple[httpx.Response, float]]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            slow = asyncio.ensure_future(
                c.post("/rerank", json={"query": "q", "documents": [slow_doc(1.5)]})
            )
            await asyncio.sleep(0.3)  # the slow one holds the only worker

            async def timed(i: int) -> tuple[httpx.Response, float]:
                t = time.monotonic()
                r = await c.post("/rerank", json={"query": "q", "documents": [f"doc {i}", "x"]})
                return r, time.monotonic() - t

            rest = await asyncio.gather(*(timed(i) for i in range(12)))
            return await slow, rest

    slow, rest = asyncio.run(asyncio.wait_for(go(), 60))
    assert slow.status_code == 200
    refused = [(r, dt) for r, dt in rest if r.status_code == 503]
    served = [r for r, _ in rest if r.status_code == 200]
    assert len(refused) >= 8, [r.status_code for r, _ in rest]
    assert len(served) + len(refused) == len(rest)
    for r, dt in refused:
        assert r.json()["error"]["type"] == "overloaded_error"
        assert int(r.headers["retry-after"]) >= 1
        assert dt < ADMISSION_S + 1.0, dt  # refused within the admission timeout, not after a long wait
    assert normal_request(server).status_code == 200


def test_deadline_expiry_is_503(server: ThreadedServer) -> None:
    t = time.monotonic()
    r = httpx.post(
        server.url + "/rerank",
        json={"query": "q", "documents": [slow_doc(3.5)]},
        timeout=30,
    )
    dt = time.monotonic() - t
    assert r.status_code == 503, r.text
    assert r.json()["error"]["type"] == "deadline_exceeded"
    assert "retry-after" in r.headers
    assert DEADLINE_S - 0.2 <= dt < DEADLINE_S + 1.5, dt
    time.sleep(1.6)  # let the slow batch end
    assert normal_request(server).status_code == 200


def test_client_disconnect_drops_queued_work(server: ThreadedServer) -> None:
    before = httpx.get(server.url + "/metrics").text
    dropped0 = metric(before, "encapure_dropped_items_total", reason="cancelled")
    gone0 = metric(before, "encapure_http_client_disconnects_total")

    async def go() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            slow = asyncio.ensure_future(
                c.post("/rerank", json={"query": "q", "documents": [slow_doc(1.2)]})
            )
            await asyncio.sleep(0.2)
            # queued behind the slow batch; the client gives up after 0.3 s and closes its connection
            async with httpx.AsyncClient(base_url=server.url, timeout=0.3) as impatient:
                with pytest.raises(httpx.TimeoutException):
                    await impatient.post("/rerank", json={"query": "q", "documents": ["a", "b", "c", "d", "e"]})
            assert (await slow).status_code == 200

    asyncio.run(go())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        text = httpx.get(server.url + "/metrics").text
        if metric(text, "encapure_http_client_disconnects_total") > gone0:
            break
        time.sleep(0.1)
    assert metric(text, "encapure_dropped_items_total", reason="cancelled") >= dropped0 + 5
    assert metric(text, "encapure_http_client_disconnects_total") >= gone0 + 1
    assert metric(text, "encapure_http_requests_total", route="/rerank", status="499") >= 1
    assert normal_request(server).status_code == 200

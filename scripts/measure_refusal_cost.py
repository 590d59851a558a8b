"""Server-side CPU of one overload refusal through the ASGI app: the overload gate (body unread)
against the full path (parse, validate, estimate, admission), alternated.

    python scripts/measure_refusal_cost.py [EXPORTED_RERANKER_FOLDER]

The admission is saturated by one granted ticket of far more work than drains in time; the full
path runs with ``admission_timeout_s=0`` so it refuses at once too. ``time.process_time`` over 300
refusals per round, 6 rounds; uvicorn's HTTP parsing (the same for both) is not included.
"""
import asyncio
import csv
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from encapure.engine.loading import load_model  # noqa: E402
from encapure.server.testing import InProcessServer  # noqa: E402
from encapure.settings import Settings  # noqa: E402

MODEL = sys.argv[1] if len(sys.argv) > 1 else str(ROOT.parent / "shared" / "models" / "minilm-l6-wikiqa-reranker")


def body_of_8_pairs() -> bytes:
    rows: dict[str, tuple[str, list[str]]] = {}
    path = ROOT.parent / "shared" / "data" / "wikiqa" / "WikiQA-test-gold.tsv"
    with path.open(encoding="utf-8") as f:
        for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            rows.setdefault(r["QuestionID"], (r["Question"], []))[1].append(r["Sentence"])
    q, docs = next((q, d) for q, d in rows.values() if len(d) == 8)
    return json.dumps({"query": q, "documents": docs}).encode()


async def main() -> None:
    body = body_of_8_pairs()
    s = Settings(workers=1, admission_timeout_s=0.0, warmup_budget_s=0)
    async with InProcessServer({"rr": load_model(MODEL, settings=s)}, s) as srv:
        sched = srv.state.scheduler
        assert sched is not None
        adm = sched.admission
        await srv.client.post("/rerank", content=body)  # the throughput is measured
        ticket = await adm.admit(1, adm.throughput * 300, time.monotonic() + 600)  # saturated
        real = sched.refuse_early
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/rerank", "raw_path": b"/rerank", "query_string": b"", "root_path": "",
                 "headers": [(b"host", b"x"), (b"content-type", b"application/json"),
                             (b"content-length", str(len(body)).encode())],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}

        async def receive() -> dict:
            return {"type": "http.request", "body": body, "more_body": False}

        async def one() -> bytes:
            sent: list[dict] = []

            async def send(m: dict) -> None:
                sent.append(m)

            await srv.app(dict(scope, state={}), receive, send)
            assert sent[0]["status"] == 503, sent
            return sent[1]["body"]

        res: dict[str, list[float]] = {"gate": [], "full": []}
        for _ in range(6):
            for mode in ("gate", "full"):
                sched.refuse_early = real if mode == "gate" else (lambda *a: None)  # type: ignore[method-assign]
                assert (b"fills what it can" in await one()) == (mode == "gate")
                t0 = time.process_time()
                for _ in range(300):
                    await one()
                res[mode].append((time.process_time() - t0) / 300 * 1e6)
        sched.refuse_early = real  # type: ignore[method-assign]
        adm.release(ticket, claimed=False)
    for k, v in res.items():
        print(f"{k}: us of CPU per refusal, 6 rounds: {[round(x) for x in v]}, median {sorted(v)[3]:.0f}")
    print(f"body: {len(body)} bytes (8 WikiQA pairs)")


asyncio.run(main())

"""The benchmark's load generator against a tiny real HTTP server on 127.0.0.1.

Checks bookkeeping, not timings: every request is recorded with its status and a positive
latency, statuses other than 200 are counted as errors by status, request/time bounds hold, and
the open-loop mode sends at the asked rate without waiting for answers.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

# benchmarks/ is a top-level package of the repo, not part of the installed encapure package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import WIKIQA_TEST, need

from benchmarks import loadgen
from benchmarks.loadgen import HttpRequest
from benchmarks.workloads import Request, Workload, load_wikiqa, mean_average_precision
from encapure.evaluation import average_precision, load_dataset


class _Handler(BaseHTTPRequestHandler):
    """POST /rerank: scores = document lengths; a query "busy" gets 503, "slow" sleeps 0.3 s."""

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if body["query"] == "busy":
            self.send_response(503)
            self.send_header("Retry-After", "1")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if body["query"] == "slow":
            time.sleep(0.3)
        out = json.dumps({"scores": [float(len(d)) for d in body["documents"]]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def _req(query: str, docs: list[str], key: object) -> HttpRequest:
    return HttpRequest("/rerank", json.dumps({"query": query, "documents": docs}).encode(), len(docs), key=key)


def test_closed_loop_records_status_and_latency(server: str) -> None:
    reqs = [_req("q", ["a", "bbb"], "ok1"), _req("busy", ["x"], "busy"), _req("q", ["cc", "d", "eeee"], "ok2")]
    res = loadgen.run_closed(server, reqs, concurrency=3, max_requests=30, duration_s=10, keep_bodies=True)
    assert len(res.records) == 30  # bounded by count, far inside the time bound
    assert all(r.latency > 0 for r in res.records)
    by_key = {r.key: r.status for r in res.records}
    assert by_key == {"ok1": 200, "busy": 503, "ok2": 200}
    s = res.summary()
    assert s["requests"] == 30 and s["ok"] == 20 and s["errors"] == {"503": 10}
    assert s["items_per_s"] == pytest.approx(sum(r.items for r in res.records if r.status == 200) / res.wall_s)
    assert s["p50_ms"] is not None and s["p50_ms"] <= s["p99_ms"] <= s["max_ms_all"]
    scores = loadgen.bodies_by_key(res, lambda b: json.loads(b)["scores"])
    assert scores == {"ok1": [1.0, 3.0], "ok2": [2.0, 1.0, 4.0]}


def test_closed_loop_is_bounded_in_time(server: str) -> None:
    t0 = time.perf_counter()
    res = loadgen.run_closed(server, [_req("slow", ["a"], 0)], concurrency=2, max_requests=10_000, duration_s=1.0)
    assert time.perf_counter() - t0 < 5
    assert 2 <= len(res.records) < 20
    assert min(r.latency for r in res.records) >= 0.29


def test_open_loop_sends_at_rate_without_waiting(server: str) -> None:
    # Each answer takes 0.3 s; 20 req/s for 1 s must still send ~20 requests (open loop).
    res = loadgen.run_open(server, [_req("slow", ["a"], 0)], rate=20, max_requests=1000, duration_s=1.0,
                           arrivals="uniform")
    assert 18 <= len(res.records) <= 20
    assert all(r.status == 200 for r in res.records)
    assert max(r.start for r in res.records) < 1.0 + 1e-6
    assert res.summary()["p50_ms"] >= 290


def test_connection_errors_and_loopback_only() -> None:
    res = loadgen.run_closed("http://127.0.0.1:9", [_req("q", ["a"], 0)], concurrency=1, max_requests=3,
                             duration_s=5, timeout_s=2)
    assert [r.status for r in res.records] == [loadgen.STATUS_CONN_ERROR] * 3
    with pytest.raises(ValueError):
        loadgen.LoadGenerator("http://10.0.0.1:80")


def test_map_of_responses_matched_by_key() -> None:
    """The benchmark's MAP is encapure.evaluation's, over the questions that got a complete answer."""
    assert average_precision([0, 1, 1], [0.9, 0.1, 0.5]) == pytest.approx((1 / 2 + 2 / 3) / 2)
    wl = Workload("t", "rerank", [Request(["a", "b"], "q", key=1, labels=[1, 0]),
                                  Request(["c", "d"], "q", key=2, labels=[0, 1]),
                                  Request(["e"], "q", key=3, labels=[0]),  # no positive: not scored
                                  Request(["f", "g"], "q", key=4, labels=[1, 0]),  # short answer: left out
                                  Request(["h", "i"], "q", key=5, labels=[0, 1])])  # no answer: left out
    mp, n = mean_average_precision(wl, {1: [0.9, 0.1], 2: [0.9, 0.1], 3: [0.2], 4: [0.1]})
    assert n == 2 and mp == pytest.approx((1.0 + 0.5) / 2)
    mp, n = mean_average_precision(wl, {})
    assert n == 0 and mp != mp  # NaN: nothing answered


def test_wikiqa_workload_is_the_evaluation_reader() -> None:
    wl = load_wikiqa(need(WIKIQA_TEST))
    groups = load_dataset(WIKIQA_TEST)
    assert [(r.key, r.query, r.texts, r.labels) for r in wl.requests] == [
        (g.qid, g.query, g.documents, g.labels) for g in groups]
    assert wl.items == 2351 and len(wl.requests) == 243


def test_profile_counts_either_runtime_as_inside() -> None:
    """With ``--backend auto`` the server may run OpenVINO: its ``infer`` is runtime time, as ONNX
    Runtime's ``session.run`` is (a run once reported 0% inside the runtime for an OpenVINO server)."""
    from benchmarks.runner import summarize_profile

    ort = "run (onnxruntime/capi/onnxruntime_inference_collection.py:220)"
    ov = "InferRequest.infer (/x/site-packages/openvino/_ov_api.py:171)"
    raw = "\n".join([
        f"main (a.py:1);OnnxModel.forward (encapure/engine/model.py:9);{ort} 3",
        f"main (a.py:1);OnnxModel.forward (encapure/engine/model.py:9);{ov};_ (openvino/utils/x.py:5) 5",
        "main (a.py:1);Runner.run (asyncio/runners.py:118) 2",
    ])
    p = summarize_profile(raw)
    assert p["samples"] == 10 and p["in_runtime_share"] == pytest.approx(0.8)
    assert p["top_self_outside"] == [("Runner.run (asyncio/runners.py)", pytest.approx(0.2))]

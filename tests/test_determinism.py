"""Same input, same score: through a real server under concurrency, at the default precision (int8).

Dynamic int8 failed this (a pair moved by up to 0.44 logits with its batch-mates); calibrated static
int8 fixes every activation scale at export time, so a request's result must equal the solo result.
Checked on ONNX Runtime and on the default backend (auto: the runtime the probe picks on this CPU; the
solo model and the server share one probe record, as every process on a machine does).
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from encapure.engine import Embedder, Reranker
from encapure.server.testing import ServerProcess
from encapure.settings import Settings

BACKENDS = ["onnxruntime", "auto"]


def _backend(name: str, cache: Path) -> tuple[Settings, dict[str, str]]:
    """The solo model's settings and the server's environment for one backend, sharing one cache."""
    return (Settings(backend=name, cache_dir=cache),  # type: ignore[arg-type]
            {"ENCAPURE_BACKEND": name, "ENCAPURE_CACHE_DIR": str(cache)})

WORDS = [
    "the", "capital", "of", "france", "paris", "river", "city", "museum", "vaccine", "immune", "system",
    "cell", "protein", "market", "stock", "price", "rain", "cloud", "ocean", "history", "king", "code",
    "python", "function", "Berlin", "Tokyo", "東京", "río", "música",
]


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def _gather(url: str, path: str, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    async def go() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
            return await asyncio.gather(*(c.post(path, json=b) for b in bodies))

    return asyncio.run(go())


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_64_concurrent_reranks_equal_solo_at_default_precision(reranker_int8_dir: Path, backend: str,
                                                               tmp_path: Path) -> None:
    rng = random.Random(3)
    bodies = [{"query": _sentence(rng, rng.randint(2, 10)),
               "documents": [_sentence(rng, rng.randint(2, 60)) for _ in range(rng.choice([1, 3, 6, 10]))],
               "raw_scores": True} for _ in range(64)]
    settings, env = _backend(backend, tmp_path)
    solo = Reranker.from_pretrained(reranker_int8_dir, settings=settings)
    assert solo.model.manifest.precision == "int8" and solo.model.manifest.quantization["method"] == "static"
    with ServerProcess(["--model", f"rr={reranker_int8_dir}", "--request-timeout", "300"], env=env) as server:
        responses = _gather(server.url, "/rerank", bodies)
        metrics = httpx.get(server.url + "/metrics").text
    assert [r.status_code for r in responses] == [200] * 64
    worst = 0.0
    for body, r in zip(bodies, responses, strict=True):
        alone = solo.score([(body["query"], d) for d in body["documents"]], raw_scores=True)
        worst = max(worst, float(np.abs(np.asarray(r.json()["scores"]) - alone).max()))
    assert worst <= 1e-5, f"a concurrent score differs from its solo score by {worst:.2e}"
    # the requests really shared batches: more requests than batches
    values = {ln.split("{")[0]: float(ln.split()[-1]) for ln in metrics.splitlines()
              if ln.startswith("encapure_batch_requests_")}
    assert values["encapure_batch_requests_sum"] > values["encapure_batch_requests_count"]


@pytest.mark.slow
@pytest.mark.parametrize("backend", [*BACKENDS, "openvino-ir"])
def test_64_concurrent_embeddings_equal_solo_at_default_precision(request: pytest.FixtureRequest, backend: str,
                                                                  tmp_path: Path) -> None:
    """``openvino-ir``: the NNCF static int8 IR on OpenVINO, which ``--backend auto`` serves for an int8
    embedder exported on load where the probe across formats finds it faster."""
    rng = random.Random(4)
    bodies = [{"input": [_sentence(rng, rng.randint(1, 80)) for _ in range(rng.choice([1, 2, 5, 8]))],
               "model": "emb"} for _ in range(64)]
    if backend == "openvino-ir":
        folder: Path = request.getfixturevalue("embedder_int8_ir_dir")
        backend = "openvino"
    else:
        folder = request.getfixturevalue("embedder_int8_dir")
    settings, env = _backend(backend, tmp_path)
    solo = Embedder.from_pretrained(folder, settings=settings)
    assert solo.model.manifest.quantization["method"] in ("static", "nncf_ptq")
    with ServerProcess(["--model", f"emb={folder}", "--request-timeout", "300"], env=env) as server:
        responses = _gather(server.url, "/v1/embeddings", bodies)
    assert [r.status_code for r in responses] == [200] * 64
    worst = 0.0
    for body, r in zip(bodies, responses, strict=True):
        got = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
        worst = max(worst, float(np.abs(got - solo.embed(body["input"])).max()))
    assert worst <= 1e-5, f"a concurrent embedding differs from its solo one by {worst:.2e}"

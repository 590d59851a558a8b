"""Startup and shutdown: not ready before the models are warm, a real drain on SIGTERM, exit 0."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from encapure.server.app import create_app
from encapure.server.testing import ServerProcess
from encapure.settings import Settings


def test_sigterm_during_load_loses_no_request(reranker_int8_dir: Path) -> None:
    srv = ServerProcess(
        ["--model", f"rr={reranker_int8_dir}", "--workers", "1", "--shutdown-timeout", "30", "--max-wait-ms", "1"],
        env={"ENCAPURE_FAULT_INJECTION": "1"},
    )
    srv.start()
    try:

        async def go() -> tuple[list[httpx.Response], httpx.Response, httpx.Response, float]:
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
                inflight = [
                    asyncio.ensure_future(
                        c.post(
                            "/rerank",
                            json={"query": "q", "documents": [f"document {i}"] * (1 + i % 3)},
                            headers={"X-Encapure-Fault": "slow:1500"},
                        )
                    )
                    for i in range(8)
                ]
                await asyncio.sleep(0.3)
                t_sig = time.monotonic()
                srv.signal(signal.SIGTERM)
                await asyncio.sleep(0.3)
                # a fresh connection: the server still listens while it drains, and says 503
                async with httpx.AsyncClient(base_url=srv.url, timeout=10) as fresh:
                    ready = await fresh.get("/ready")
                    new = await fresh.post("/rerank", json={"query": "q", "documents": ["late"]})
                done = await asyncio.gather(*inflight)
                return done, ready, new, time.monotonic() - t_sig

        done, ready, new, _ = asyncio.run(asyncio.wait_for(go(), 90))
        assert [r.status_code for r in done] == [200] * 8, [r.text for r in done if r.status_code != 200]
        assert ready.status_code == 503 and ready.json()["error"]["type"] == "shutting_down"
        assert new.status_code == 503 and new.json()["error"]["type"] == "shutting_down"
        assert "retry-after" in new.headers
        assert srv.wait(60) == 0, srv.log_text()[-3000:]
        log = srv.log_text()
        assert "draining" in log and "Traceback" not in log
    finally:
        srv.stop()


def test_sigint_when_idle_exits_0(reranker_int8_dir: Path) -> None:
    from encapure.engine import load_model

    srv = ServerProcess(["--model", str(reranker_int8_dir), "--log-format", "json"])
    srv.start()
    try:
        body = {"query": "capital of France", "documents": ["Paris is the capital of France.", "Berlin."]}
        r = httpx.post(srv.url + "/rerank", json=body, headers={"X-Request-ID": "r-1"})
        assert r.status_code == 200
        # the model is named after its folder; the JSON log line carries the request's context
        assert r.json()["model"] == reranker_int8_dir.name
        # the real process serves the real model: the engine's scores for the same request alone
        engine = load_model(reranker_int8_dir)
        prepared = engine.prepare_pairs(body["query"], body["documents"])
        expected = engine.finish(prepared, engine.forward(prepared.units)).scores
        np.testing.assert_allclose(r.json()["scores"], expected, rtol=0, atol=1e-5)
        srv.signal(signal.SIGINT)
        assert srv.wait(30) == 0
        lines = [ln for ln in srv.log_text().splitlines() if '"request_id":"r-1"' in ln]
        assert lines and '"route":"/rerank"' in lines[0] and '"status":200' in lines[0]
    finally:
        srv.stop()


def test_unloadable_model_exits_nonzero_without_traceback_to_clients(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "encapure", "serve", "--model", str(tmp_path / "nothing-here"), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "failed to load models" in proc.stderr


def test_not_ready_while_starting() -> None:
    """Before the models are loaded (the app's lifespan has not run), work and /ready are 503."""
    app = create_app(Settings(model=["unused"]))

    async def go() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return (
                await c.get("/ready"),
                await c.post("/rerank", json={"query": "q", "documents": ["d"]}),
                await c.get("/health"),
            )

    ready, work, health = asyncio.run(go())
    for r in (ready, work):
        assert r.status_code == 503
        assert r.json()["error"]["type"] == "not_ready"
        assert int(r.headers["retry-after"]) >= 1
    assert health.status_code == 200 and health.json()["status"] == "starting"


@pytest.mark.parametrize("flag", ["--port", "--max-batch-size"])
def test_cli_flags_build_settings(flag: str) -> None:
    from encapure.cli import build_parser
    from encapure.server.cli import settings_from_args

    args = build_parser().parse_args(["serve", flag, "123", "--model", "a=x", "--model", "y", "--admission-timeout", "0.1"])
    s = settings_from_args(args)
    assert getattr(s, flag[2:].replace("-", "_")) == 123
    assert s.model == ["a=x", "y"] and s.admission_timeout_s == 0.1


def test_dead_worker_turns_health_503(reranker_int8_dir: Path) -> None:
    with ServerProcess(
        ["--model", f"rr={reranker_int8_dir}", "--workers", "1"], env={"ENCAPURE_FAULT_INJECTION": "1"}
    ) as srv:
        assert httpx.get(srv.url + "/health").status_code == 200
        r = httpx.post(
            srv.url + "/rerank",
            json={"query": "q", "documents": ["d"]},
            headers={"X-Encapure-Fault": "kill_worker"},
            timeout=30,
        )
        assert r.status_code == 500 and r.json()["error"]["type"] == "worker_died", r.text
        health = httpx.get(srv.url + "/health")
        assert health.status_code == 503 and "worker" in health.json()["error"]["message"]
        assert httpx.get(srv.url + "/ready").status_code == 503
        after = httpx.post(srv.url + "/rerank", json={"query": "q", "documents": ["d"]}, timeout=30)
        assert after.status_code >= 500 and "error" in after.json()  # answered at once, never hangs


def test_model_specs_names_and_default(tmp_path: Path) -> None:
    from encapure.errors import InvalidInputError
    from encapure.server.loading import find_fixture, parse_specs

    folder = tmp_path / "my-model"
    folder.mkdir()
    specs = parse_specs(Settings(model=["BAAI/bge-reranker-v2-m3", f"emb={folder}", str(folder)]))
    assert [(s.name, s.source, s.is_default) for s in specs] == [
        ("BAAI/bge-reranker-v2-m3", "BAAI/bge-reranker-v2-m3", False),  # asked for: no silent fallback
        ("emb", str(folder), False),
        ("my-model", str(folder), False),
    ]
    default = parse_specs(Settings())
    assert default[0].is_default or "model" in Settings().model_fields_set
    with pytest.raises(InvalidInputError, match="two models"):
        parse_specs(Settings(model=[f"a={folder}", f"a={folder}"]))
    fixture = find_fixture()
    if fixture is not None:
        assert (fixture / "config.json").is_file()


def test_offline_hub_id_says_unreachable_before_any_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """Offline, the first log lines said "exporting BAAI/…" and only then that the hub was down:
    the download now comes first, in the serving process, and the export never starts."""
    import logging

    from encapure.errors import ExportError
    from encapure.server import loading

    def unreachable(repo_id: str) -> Path:
        raise ExportError(f"cannot download {repo_id}: the Hugging Face hub is unreachable (offline?)")

    monkeypatch.setattr(loading, "download", unreachable)
    monkeypatch.setattr(loading, "missing_export_modules", lambda: [])
    monkeypatch.setattr(loading.subprocess, "run", lambda *a, **k: pytest.fail("export started"))
    with caplog.at_level(logging.INFO, logger="encapure.server"), pytest.raises(ExportError, match="unreachable"):
        loading.export_in_child("BAAI/bge-reranker-v2-m3", settings=Settings(cache_dir=tmp_path))
    assert "exporting" not in caplog.text and "fetching BAAI/bge-reranker-v2-m3" in caplog.text

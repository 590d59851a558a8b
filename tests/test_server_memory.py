"""The server's memory settings: the worker count sized by the model, glibc malloc arenas and trim.

Correctness only (what resolves to what, that the malloc calls are honoured and harmless); the
memory they save is measured by scripts/measure_bge_memory.py, not asserted here.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fakes import fake_model

from encapure.server import memory
from encapure.server.loading import estimate_parameters, parse_specs, sized_settings
from encapure.server.testing import InProcessServer
from encapure.settings import LARGE_MODEL_PARAMETERS, Settings

MB = 1_000_000


def exported(folder: Path, precision: str, files: dict[str, int], model_file: str = "model.xml") -> Path:
    """An exported-looking folder: a manifest and sparse files of the given sizes (nothing is loaded)."""
    folder.mkdir(parents=True)
    manifest = {"task": "rerank", "precision": precision, "max_length": 512, "input_names": ["input_ids"],
                "output_name": "logits", "output_kind": "logits", "model_file": model_file,
                "tokenizer_file": "tokenizer.json"}
    (folder / "encapure.json").write_text(json.dumps(manifest))
    for name, size in {**files, "tokenizer.json": 17 * MB}.items():
        with open(folder / name, "wb") as f:
            f.truncate(size)
    return folder


@pytest.fixture(autouse=True)
def _no_workers_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ENCAPURE_WORKERS", raising=False)


def test_workers_for_sizes_only_an_unset_count(monkeypatch: pytest.MonkeyPatch) -> None:
    s = Settings()
    assert s.workers_for(None) == s.workers == 2
    assert s.workers_for(LARGE_MODEL_PARAMETERS - 1) == 2
    assert s.workers_for(LARGE_MODEL_PARAMETERS) == 1
    # set by argument or environment: honoured as given, whatever the model
    assert Settings(workers=2).workers_for(10 * LARGE_MODEL_PARAMETERS) == 2
    monkeypatch.setenv("ENCAPURE_WORKERS", "3")
    assert Settings().workers_for(10 * LARGE_MODEL_PARAMETERS) == 3


def test_estimate_parameters_from_weight_files(tmp_path: Path) -> None:
    s = Settings(cache_dir=tmp_path / "cache")
    # bge-reranker-v2-m3's int4 IR: 293 MB of model.bin, half a byte a parameter
    ir = exported(tmp_path / "ir", "int4", {"model.xml": 1 * MB, "model.bin": 293 * MB})
    assert estimate_parameters(str(ir), s) == pytest.approx(588 * MB, rel=0.01)
    small = exported(tmp_path / "small", "int8", {"model.onnx": 23 * MB}, model_file="model.onnx")
    assert estimate_parameters(str(small), s) == pytest.approx(23 * MB, rel=0.01)
    # a large ONNX file keeps its weights in a side file, which counts
    big = exported(tmp_path / "big", "fp32", {"model.onnx": 1 * MB, "model.onnx.data": 2200 * MB},
                   model_file="model.onnx")
    assert estimate_parameters(str(big), s) == pytest.approx(550 * MB, rel=0.01)
    assert estimate_parameters(str(big / "model.onnx"), s) == pytest.approx(550 * MB, rel=0.01)
    # nothing on disk to size (a hub id not exported yet): unknown
    assert estimate_parameters("some-org/not-downloaded", s) is None


def test_estimate_parameters_of_a_hugging_face_folder(tmp_path: Path) -> None:
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"torch_dtype": "float16"}))
    with open(hf / "model.safetensors", "wb") as f:
        f.truncate(1136 * MB)
    assert estimate_parameters(str(hf), Settings(cache_dir=tmp_path / "cache")) == pytest.approx(568 * MB)


def test_sized_settings_one_pool_for_every_model(tmp_path: Path) -> None:
    ir = exported(tmp_path / "ir", "int4", {"model.xml": 1 * MB, "model.bin": 293 * MB})
    small = exported(tmp_path / "small", "int8", {"model.onnx": 23 * MB}, model_file="model.onnx")
    cache = tmp_path / "cache"
    alone = Settings(model=[str(small)], cache_dir=cache)
    assert sized_settings(alone, parse_specs(alone)) is alone  # small models keep the default
    both = Settings(model=[f"a={small}", f"b={ir}"], cache_dir=cache)
    sized = sized_settings(both, parse_specs(both))
    assert sized.workers == 1 and sized.resolved_threads() == os.cpu_count()
    assert sized.model == both.model and both.workers == 2  # a copy; the given settings are unchanged
    chosen = Settings(model=[str(ir)], cache_dir=cache, workers=2)
    assert sized_settings(chosen, parse_specs(chosen)).workers == 2


def test_cap_arenas_is_honoured_and_harmless() -> None:
    """In a child process: the cap changes the process for good."""
    code = ("import sys; from encapure.server import memory; "
            "applied = memory.cap_arenas(int(sys.argv[1])); "
            "import numpy as np, threading; "
            "ts = [threading.Thread(target=lambda: np.ones(1 << 20).sum()) for _ in range(8)]; "
            "[t.start() for t in ts]; [t.join() for t in ts]; print(applied)")
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])

    def run(arenas: int, **extra: str) -> str:
        out = subprocess.run([sys.executable, "-c", code, str(arenas)], env={**env, **extra}, capture_output=True,
                             text=True, check=True)
        return out.stdout.strip()

    glibc = memory._glibc() is not None
    assert run(2) == str(glibc)
    assert run(0) == "False"  # 0: glibc's own default
    assert run(2, MALLOC_ARENA_MAX="4") == "False"  # glibc already applied the environment's


def test_idle_trim_runs_only_when_enabled() -> None:
    assert memory.IdleTrim(False)() is False
    trim = memory.IdleTrim(True)
    assert trim() is (memory._glibc() is not None)
    assert trim.delay() >= memory.TRIM_IDLE_S
    assert bytearray(10 * MB)[-1] == 0  # the heap works after a trim


@pytest.mark.anyio
@pytest.mark.parametrize("enabled", [True, False])
async def test_server_trims_after_requests_only_when_asked(monkeypatch: pytest.MonkeyPatch, enabled: bool) -> None:
    if enabled and memory._glibc() is None:
        pytest.skip("malloc_trim is glibc's; this C library has none")
    calls: list[float] = []
    monkeypatch.setattr(memory.IdleTrim, "__call__", lambda self: calls.append(1.0) or True)
    monkeypatch.setattr(memory, "TRIM_IDLE_S", 0.01)
    settings = Settings(malloc_trim=enabled, request_timeout_s=300)
    async with InProcessServer({"rr": fake_model("rerank", name="rr")}, settings) as srv:
        at_ready = len(calls)
        r = await srv.client.post("/rerank", json={"query": "q", "documents": ["a", "b"]})
        assert r.status_code == 200
        for _ in range(100):
            if len(calls) > at_ready or not enabled:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.05)
        info = (await srv.client.get("/info")).json()
    assert info["limits"]["workers"] == 2  # stand-in models are not sized
    assert (at_ready, len(calls) > at_ready) == ((1, True) if enabled else (0, False))

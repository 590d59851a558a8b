"""The one settings object: env vars as people write them, flags over env over defaults."""

from __future__ import annotations

import pytest

from encapure.settings import DEFAULT_RERANKER, Settings


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ENCAPURE_MODEL", raising=False)
    assert Settings().model == [DEFAULT_RERANKER]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("org/model", ["org/model"]), ("a, b", ["a", "b"]), ('["x", "y"]', ["x", "y"]), ("rr=/m", ["rr=/m"])],
)
def test_model_env_forms(monkeypatch: pytest.MonkeyPatch, raw: str, expected: list[str]) -> None:
    monkeypatch.setenv("ENCAPURE_MODEL", raw)
    assert Settings().model == expected


def test_explicit_beats_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENCAPURE_MAX_BATCH_TOKENS", "123")
    assert Settings().max_batch_tokens == 123
    assert Settings(max_batch_tokens=7).max_batch_tokens == 7


@pytest.mark.parametrize("var", ["ENCAPURE_CACHE", "ENCAPURE_CACHE_DIR"])
def test_cache_env_names(monkeypatch: pytest.MonkeyPatch, tmp_path, var: str) -> None:
    monkeypatch.delenv("ENCAPURE_CACHE", raising=False)
    monkeypatch.delenv("ENCAPURE_CACHE_DIR", raising=False)
    monkeypatch.setenv(var, str(tmp_path))
    assert Settings().cache_dir == tmp_path


def test_bad_env_value_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENCAPURE_PRECISION", "int3")
    with pytest.raises(ValueError):
        Settings()

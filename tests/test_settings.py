"""The one settings object: env vars as people write them, flags over env over defaults."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from pydantic import ValidationError

from encapure.cli import build_parser, main
from encapure.server.cli import settings_from_args
from encapure.settings import (
    DEFAULT_RERANKER,
    PRECISIONS,
    Settings,
    env_name,
    flag_fields,
    flag_name,
    markdown_table,
)


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


# --- validation at parse time (the scheduler used to check these when it started) -------------------
_BAD = [
    ("workers", 0), ("max_batch_size", 0), ("max_batch_tokens", 0), ("max_concurrent_requests", 0),
    ("max_queued_items", 0), ("max_wait_ms", -1), ("admission_timeout_s", -0.5), ("request_timeout_s", -1),
    ("threads_per_worker", -1), ("port", 70000), ("max_length", 0), ("window_overlap", -1),
    ("max_request_bytes", 0), ("max_client_batch_size", 0), ("shutdown_timeout_s", -1), ("model", []),
    ("admission_deadline_share", 0), ("admission_deadline_share", 1.5), ("admission_backlog_share", 0),
    ("admission_backlog_share", 2), ("keep_alive_timeout_s", 0),
]


@pytest.mark.parametrize(("field", "value"), _BAD)
def test_bad_values_fail_when_parsed(monkeypatch: pytest.MonkeyPatch, field: str, value: object) -> None:
    with pytest.raises(ValidationError, match=field):
        Settings(**{field: value})
    if not isinstance(value, list):
        monkeypatch.setenv(f"ENCAPURE_{field.upper()}", str(value))
        with pytest.raises(ValidationError, match=field):
            Settings()
        monkeypatch.delenv(f"ENCAPURE_{field.upper()}")
    s = Settings()
    with pytest.raises(ValidationError, match=field):  # assignment is checked too
        setattr(s, field, value)


def test_edges_are_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    s = Settings(workers=1, max_wait_ms=0, admission_timeout_s=0, request_timeout_s=0, threads_per_worker=0,
                 port=0, max_length=None)
    assert s.workers == 1 and s.port == 0
    s = Settings(admission_deadline_share=1, admission_backlog_share=1)
    assert (s.admission_deadline_share, s.admission_backlog_share) == (1, 1)
    monkeypatch.setenv("ENCAPURE_LOG_LEVEL", "WARNING")
    assert Settings().log_level == "warning"


def test_cli_names_the_bad_setting(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("ENCAPURE_MAX_BATCH_SIZE", "0")
    assert main(["serve", "--workers", "0"]) == 2  # fails before anything is loaded or bound
    err = capsys.readouterr().err
    assert "--workers / ENCAPURE_WORKERS" in err and "greater than or equal to 1" in err
    assert "--max-batch-size / ENCAPURE_MAX_BATCH_SIZE" in err
    assert "Traceback" not in err


# --- one source for flags, precisions and their docs ----------------------------------------------
def _subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {opt: a for a in parser._actions for opt in a.option_strings}


def test_every_setting_is_a_serve_flag_with_its_field_as_dest() -> None:
    serve = _options(_subparser("serve"))
    for name in Settings.model_fields:
        if name == "fault_injection":  # tests only: environment, never a flag
            assert flag_name(name) not in serve
            continue
        assert serve[flag_name(name)].dest == name
    args = build_parser().parse_args(["serve", "--shutdown-timeout", "3", "--no-prepacking", "--providers", "cpu"])
    s = settings_from_args(args)
    assert s.shutdown_timeout_s == 3 and s.prepacking is False and s.providers == ["cpu"]


def test_precision_choices_have_one_source() -> None:
    assert PRECISIONS == ("fp32", "fp16", "int8", "int4")
    for cmd in ("serve", "eval", "export"):
        assert tuple(_options(_subparser(cmd))["--precision"].choices) == PRECISIONS  # type: ignore[arg-type]
    assert Settings(precision="int4").precision == "int4"


def test_eval_threads_is_a_deprecated_alias(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["eval", "m", "--dataset", "d", "--threads", "3"])
    assert args.threads_per_worker == 3
    assert "--threads is deprecated; use --threads-per-worker" in capsys.readouterr().err
    args = build_parser().parse_args(["eval", "m", "--dataset", "d", "--threads-per-worker", "2"])
    assert args.threads_per_worker == 2
    assert "--threads " not in _subparser("eval").format_help()  # hidden


def test_docs_flag_table_matches_settings() -> None:
    text = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text(encoding="utf-8")
    start, end = "<!-- flags:start -->\n", "<!-- flags:end -->"
    assert start in text and end in text
    block = text[text.index(start) + len(start) : text.index(end)]
    assert block == markdown_table(), "docs/api.md is out of date: python -m encapure.settings --markdown"
    for name in flag_fields():
        assert f"`{env_name(name)}`" in block

"""``encapure serve``: flags build ``Settings(**given)`` so unset ones fall through to ENCAPURE_* env."""

from __future__ import annotations

import argparse
from typing import Any

from encapure.settings import Settings

# flag -> Settings field (when the names differ)
_FIELDS = {
    "admission_timeout": "admission_timeout_s",
    "request_timeout": "request_timeout_s",
    "shutdown_timeout": "shutdown_timeout_s",
}


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "serve",
        help="run the HTTP service",
        description="Serve rerank / embedding / classification models over HTTP with cross-request "
        "batching. Unset flags come from ENCAPURE_* environment variables, then defaults.",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument(
        "--model",
        action="append",
        metavar="[NAME=]ID_OR_FOLDER",
        help="model to serve (repeatable): an exported folder, a Hugging Face folder or a hub id; "
        "default BAAI/bge-reranker-v2-m3 (offline: the local reranker fixture)",
    )
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (not on /health, /ready and the docs)")
    p.add_argument(
        "--precision", choices=["fp32", "fp16", "int8", "int4"], help="for models exported on load"
    )
    p.add_argument("--max-batch-tokens", type=int, help="padded tokens per batch")
    p.add_argument("--max-batch-size", type=int)
    p.add_argument("--max-wait-ms", type=float, help="how long a partial batch waits for company")
    p.add_argument("--workers", type=int, help="inference worker threads")
    p.add_argument(
        "--threads-per-worker", type=int, help="ONNX Runtime threads per worker (0: cores / workers)"
    )
    p.add_argument(
        "--prepacking", action=argparse.BooleanOptionalAction,
        help="let ONNX Runtime pre-pack weights into kernel layouts (faster; off saves memory only in rare setups)",
    )
    p.add_argument("--max-concurrent-requests", type=int)
    p.add_argument("--max-queued-items", type=int)
    p.add_argument(
        "--admission-timeout", type=float, help="seconds a request may wait for capacity before 503"
    )
    p.add_argument(
        "--request-timeout", type=float, help="seconds before a request's queued work is dropped (503)"
    )
    p.add_argument("--max-request-bytes", type=int)
    p.add_argument("--max-client-batch-size", type=int, help="most documents/texts in one request (else 413)")
    p.add_argument(
        "--shutdown-timeout", type=float, help="seconds in-flight requests get to finish on SIGTERM"
    )
    p.add_argument("--log-format", choices=["text", "json"])
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    _annotate_defaults(p)
    p.set_defaults(func=run)


def _annotate_defaults(parser: argparse.ArgumentParser) -> None:
    """Say in --help what an unset flag falls back to: its environment variable, then the default."""
    fields = Settings.model_fields
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "func"):
            continue
        name = _FIELDS.get(action.dest, action.dest)
        field = fields.get(name)
        if field is None:
            continue
        default = field.get_default(call_default_factory=True)
        if isinstance(default, list):
            default = ",".join(str(x) for x in default)
        extra = f"env ENCAPURE_{name.upper()}; default {default}"
        action.help = f"{action.help} ({extra})" if action.help else extra


def settings_from_args(args: argparse.Namespace) -> Settings:
    given = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    return Settings(**{_FIELDS.get(k, k): v for k, v in given.items()})


def run(args: argparse.Namespace) -> int:
    from encapure.server.run import serve

    return serve(settings_from_args(args))

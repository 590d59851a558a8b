"""``encapure serve``: one flag per setting, generated from ``Settings``.

Flags build ``Settings(**given)`` so unset ones fall through to ENCAPURE_* env, then defaults; the
flag table in docs/api.md is generated from the same fields (``python -m encapure.settings --markdown``).
"""

from __future__ import annotations

import argparse
from typing import Any

from encapure.settings import Settings, add_settings_flags, settings_from_namespace


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "serve",
        help="run the HTTP service",
        description="Serve rerank / embedding / classification models over HTTP with cross-request "
        "batching. Unset flags come from ENCAPURE_* environment variables, then defaults.",
        argument_default=argparse.SUPPRESS,
    )
    add_settings_flags(p)
    p.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace) -> Settings:
    return settings_from_namespace(args)


def run(args: argparse.Namespace) -> int:
    from encapure.server.run import serve

    return serve(settings_from_args(args))

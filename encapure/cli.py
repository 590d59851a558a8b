"""``encapure`` command line: one parser, subcommands contributed by each layer.

Each subcommand module exposes ``register(subparsers)`` which adds its parser and sets
``func(args) -> int``. Errors of the project's hierarchy are printed as one line, no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from encapure import __version__
from encapure.errors import EncapureError
from encapure.settings import describe_error

_SUBCOMMAND_MODULES = (
    "encapure.export.cli",  # export
    "encapure.evaluation.cli",  # eval
    "encapure.server.cli",  # serve
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="encapure",
        description="Fast reranking and embeddings on ONNX Runtime.",
    )
    parser.add_argument("--version", action="version", version=f"encapure {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except EncapureError as e:
        print(f"encapure: error: {e.message}", file=sys.stderr)
        return 2 if e.status < 500 else 1
    except ValidationError as e:  # a bad flag or ENCAPURE_* variable, caught when Settings parsed it
        print(f"encapure: error: {describe_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("encapure: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""Logging for the service: one line per request with its context, as text or JSON.

Context (request id, route, sizes, timings) travels as ``extra=`` fields on the record so the JSON
formatter can emit them as keys and the text formatter as ``key=value`` pairs, like ``tracing``.
"""

from __future__ import annotations

import logging
import sys
import time
from contextvars import ContextVar
from typing import Any

import orjson

request_id_var: ContextVar[str | None] = ContextVar("encapure_request_id", default=None)
# The per-request context dict that the access log line is built from (sizes, timings, error type).
request_info_var: ContextVar[dict[str, Any] | None] = ContextVar("encapure_request_info", default=None)

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


def _context(record: logging.LogRecord) -> dict[str, Any]:
    ctx = {k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")}
    if "request_id" not in ctx:
        rid = request_id_var.get()
        if rid is not None:
            ctx["request_id"] = rid
    return ctx


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = f"{ts}.{int(record.msecs):03d}Z {record.levelname:<5} {record.name}: {record.getMessage()}"
        ctx = _context(record)
        if ctx:
            line += " " + " ".join(f"{k}={v}" for k, v in ctx.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "target": record.name,
            "message": record.getMessage(),
        }
        out.update(_context(record))
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


class StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted, not the one of set-up time.

    Why: ``StreamHandler(sys.stderr)`` keeps the stream object it was given. Whoever swaps
    ``sys.stderr`` (pytest's capture, an embedding application) and closes the old one left our
    handler writing to a closed file: every later record failed ("--- Logging error --- ...
    Message: 'request'", seen from tests/test_server_limits.py after a test had called ``serve``).
    """

    terminator = "\n"

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record)
            stream = sys.stderr
            stream.write(msg + self.terminator)
            stream.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


def setup_logging(fmt: str = "text", level: str = "info") -> None:
    """Route our loggers and uvicorn's through one handler on stderr."""
    handler = StderrHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    lvl = getattr(logging, level.upper(), logging.INFO)
    for name in ("encapure", "uvicorn", "uvicorn.error"):
        lg = logging.getLogger(name)
        lg.handlers[:] = [handler]
        lg.setLevel(lvl)
        lg.propagate = False
    # We log each request ourselves, with more context than uvicorn's access log.
    logging.getLogger("uvicorn.access").disabled = True

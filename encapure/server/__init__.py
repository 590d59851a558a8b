"""The HTTP service: routes, wire schemas, status mapping, lifecycle. Inference goes through the scheduler."""

from __future__ import annotations

from encapure.server.app import create_app
from encapure.server.run import serve

__all__ = ["create_app", "serve"]

"""The HTTP routes (being split into one module per API family)."""

from encapure.server.routes.common import DisconnectWatcher, pick_model, router, run_inference

__all__ = ["DisconnectWatcher", "pick_model", "router", "run_inference"]

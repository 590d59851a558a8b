"""The routes, one module per API family (``rerank``, ``embed``, ``multivector``, ``predict``, ``root``, ``ops``) over
what they share (``common``). Handlers validate, pick the model, hand tokenization and inference to the
scheduler and shape the answer; they never block the event loop and never map errors themselves
(they raise ``EncapureError`` and ``encapure.server.errors`` renders it).

``router`` is every family's routes in one flat list. Not ``include_router``: FastAPI (0.165) keeps an
included router as one nested entry without a ``path``, and the service middleware's route labels
(``encapure.server.app``) and the deploy test read the paths from ``router.routes``. Matching is by
path and method, and no two families share one, so the order of the families changes no answer; within
a family the order is the module's (``POST /`` before ``GET /`` in ``root``)."""

from fastapi import APIRouter

from encapure.server.routes import embed, multivector, ops, predict, rerank, root
from encapure.server.routes.common import DisconnectWatcher, pick_model, run_inference

router = APIRouter()
for _family in (rerank, embed, multivector, predict, root, ops):
    router.routes.extend(_family.router.routes)

__all__ = ["DisconnectWatcher", "pick_model", "router", "run_inference"]

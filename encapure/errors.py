"""One error hierarchy for the whole project.

Every layer raises these; the HTTP layer maps them to a status code in exactly one place
(``encapure.server.errors``) using ``EncapureError.status``. Library users catch them by type.
Messages are written for the person who sent the input: they say what was wrong and how to fix it.
"""

from __future__ import annotations


class EncapureError(Exception):
    """Base class. ``kind`` is the stable machine-readable type sent in JSON error bodies."""

    kind: str = "internal_error"
    status: int = 500

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


# --- the caller's mistakes (4xx) -------------------------------------------------------------
class InvalidInputError(EncapureError, ValueError):
    """The input cannot be processed as given (empty query, wrong types, bad option)."""

    kind = "invalid_request_error"
    status = 400


class WrongTaskError(InvalidInputError):
    """The model exists but does another task (rerank on an embedder)."""


class AuthenticationError(EncapureError):
    kind = "authentication_error"
    status = 401


class NotFoundError(EncapureError):
    kind = "not_found_error"
    status = 404


class ModelNotFoundError(NotFoundError):
    """An unknown model name or a path that holds no model."""


class PayloadTooLargeError(EncapureError):
    kind = "payload_too_large"
    status = 413


class RequestTimeoutError(EncapureError):
    """The client sent its request headers or body too slowly (``--header-timeout``,
    ``--body-timeout``); the connection is closed after this answer."""

    kind = "request_timeout"
    status = 408


# --- the server's state (503) ------------------------------------------------------------------
class UnavailableError(EncapureError):
    """Temporary: the caller should retry later (``retry_after`` seconds)."""

    kind = "service_unavailable"
    status = 503

    def __init__(self, message: str, *, retry_after: float | None = 1.0) -> None:
        super().__init__(message, retry_after=retry_after)


class OverloadedError(UnavailableError):
    kind = "overloaded_error"


class DeadlineExceededError(UnavailableError):
    kind = "deadline_exceeded"


class ShuttingDownError(UnavailableError):
    kind = "shutting_down"


class NotReadyError(UnavailableError):
    kind = "not_ready"


class CancelledRequestError(EncapureError):
    """The caller went away (client disconnected) before the work was done; nobody reads the answer."""

    kind = "request_cancelled"
    status = 499  # nginx's "client closed request": only ever seen in logs and metrics


# --- ours (5xx) --------------------------------------------------------------------------------
class ModelError(EncapureError):
    """Inference failed inside the runtime for reasons that are not the caller's."""

    kind = "model_error"
    status = 500


class WorkerDiedError(ModelError):
    kind = "worker_died"


# --- model preparation -------------------------------------------------------------------------
class ExportError(EncapureError):
    """Model preparation failed; the message says why without a traceback."""

    kind = "export_error"
    status = 500


class UnsupportedModelError(ExportError):
    kind = "unsupported_model"
    status = 400


class ParityError(ExportError):
    """The exported model does not reproduce the source model within tolerance."""

    kind = "parity_error"


class ManifestError(EncapureError):
    """A model folder's manifest is missing, unreadable or inconsistent with its files."""

    kind = "manifest_error"
    status = 500

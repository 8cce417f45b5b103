"""The service's errors and the one mapping to OpenAI's error envelope.

Every error leaves as `{"error": {"message", "type", "param", "code"}}`. Messages are written for
clients: internal exception text, paths and tracebacks stay in the log.
"""

from __future__ import annotations

import logging
import re
from typing import Any

logger = logging.getLogger(__name__)

MAX_MESSAGE_CHARS = 500
_PATH = re.compile(r"(?:[A-Za-z]:)?(?:/[\w.@+-]+){2,}/?")


class ServiceError(Exception):
    """An error with an HTTP status and an OpenAI error type."""

    status = 500
    type = "InternalServerError"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class BadRequest(ServiceError):
    status = 400
    type = "BadRequestError"


class Unauthorized(ServiceError):
    status = 401
    type = "AuthenticationError"


class Forbidden(ServiceError):
    status = 403
    type = "PermissionDeniedError"


class NotFound(ServiceError):
    status = 404
    type = "NotFoundError"


class Conflict(ServiceError):
    status = 409
    type = "ConflictError"


class PayloadTooLarge(ServiceError):
    status = 413
    type = "RequestTooLargeError"


class ServiceUnavailable(ServiceError):
    status = 503
    type = "ServiceUnavailableError"


def client_safe(text: str) -> str:
    """Cap a message and blank out anything that looks like a file-system path."""
    return _PATH.sub("<path>", text)[:MAX_MESSAGE_CHARS]


def error_body(status: int, type_: str, message: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error envelope."""
    return {
        "error": {"message": client_safe(message), "type": type_, "param": param, "code": status}
    }


def envelope(error: ServiceError) -> dict[str, Any]:
    """The envelope for a service error."""
    return error_body(error.status, error.type, error.message, error.param)


def unexpected_error_body() -> dict[str, Any]:
    """What a client sees of a bug: nothing internal."""
    return error_body(500, ServiceError.type, "internal error; see the server log")

"""Errors about adapters; the server maps each kind to its HTTP status."""

from __future__ import annotations


class AdapterError(Exception):
    """Base of adapter errors; `message` is safe to show to a client."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidAdapter(AdapterError):
    """The adapter or the request for it is malformed or does not fit the served model."""


class AdapterNotFound(AdapterError):
    """No adapter by that name, or no adapter at that path."""


class AdapterExists(AdapterError):
    """The name is taken and the request did not ask to replace it."""


class AdapterTooLarge(AdapterError):
    """The adapter exceeds a configured size limit."""

"""API-key checks: inference keys for /v1/*, compared in constant time."""

from __future__ import annotations

import hmac

from server.errors import Unauthorized


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def key_matches(token: str, keys: list[str]) -> bool:
    # Check every key so the time taken does not tell which one nearly matched.
    found = False
    for key in keys:
        found |= hmac.compare_digest(token.encode(), key.encode())
    return found


def check_inference_key(authorization: str | None, keys: list[str]) -> None:
    """Raise 401 unless keys are off or the request carries one of them."""
    if not keys:
        return
    token = bearer_token(authorization)
    if token is None:
        raise Unauthorized("missing API key: send `Authorization: Bearer <key>`")
    if not key_matches(token, keys):
        raise Unauthorized("invalid API key")

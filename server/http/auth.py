"""API-key checks: inference keys for /v1/*, admin keys for the admin API; constant-time.

The token comes from `Authorization: Bearer <token>` (`server.http.openapi.bearer_key`)."""

from __future__ import annotations

import hmac

from server.http.errors import Forbidden, Unauthorized


def key_matches(token: str, keys: list[str]) -> bool:
    # Check every key so the time taken does not tell which one nearly matched.
    found = False
    for key in keys:
        found |= hmac.compare_digest(token.encode(), key.encode())
    return found


def check_inference_key(token: str | None, keys: list[str], admin_keys: list[str]) -> None:
    """Raise 401 unless keys are off or the request's bearer token is one (admin keys too)."""
    if not keys:
        return
    if token is None:
        raise Unauthorized("missing API key: send `Authorization: Bearer <key>`")
    if not key_matches(token, keys + admin_keys):
        raise Unauthorized("invalid API key")


def check_admin_key(
    token: str | None, admin_keys: list[str], inference_keys: list[str], open_: bool
) -> None:
    """Admin routes: 403 when the admin API is off or for an inference key; 401 without a key."""
    if not admin_keys:
        if open_:
            return  # local development, allowed only on a loopback bind (Settings checks)
        raise Forbidden(
            "the admin API is off: set GEMMA_SERVER_ADMIN_KEYS (or --admin-keys) to enable it"
        )
    if token is None:
        raise Unauthorized("missing admin key: send `Authorization: Bearer <admin key>`")
    if key_matches(token, admin_keys):
        return
    if key_matches(token, inference_keys):
        raise Forbidden(
            "this key may call the inference API only; the admin API needs an admin key"
        )
    raise Unauthorized("invalid admin key")

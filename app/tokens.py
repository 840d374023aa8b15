"""API tokens: 256 random bits with a recognisable prefix; only their sha256 is stored (a fast
hash is enough for random tokens, and the API compares hashes in constant time)."""

from __future__ import annotations

import hashlib
import secrets

TOKEN_PREFIX = "sgpt_"
# The single-user mode's built-in admin: not a name `sparsegpt users add` accepts, so no account can
# take it; it has a token only once `sparsegpt users token` (no NAME) gives it one.
LOCAL_USER = "(local)"


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()

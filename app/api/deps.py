"""Dependencies: settings, a database session and Redis clients, all held by the app; the
Idempotency-Key header the POSTs that make a job or a plan take."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Annotated, Any

import redis
from fastapi import Depends, Header, HTTPException, Request, status
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import transaction


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_db(request: Request) -> Iterator[Session]:
    yield from transaction(request.app.state.sessions)


def get_redis(request: Request) -> redis.Redis:
    return request.app.state.redis


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_db)]
RedisDep = Annotated[redis.Redis, Depends(get_redis)]


_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")


def idempotency_key_header(made: str) -> Any:
    """The type of a POST's optional Idempotency-Key header; ``made`` names what the POST makes
    (a job, a plan) in its description."""
    return Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            max_length=255,
            description=f"repeat a POST safely: the same key and body return the first {made} (200)",
        ),
    ]


def check_idempotency_key(key: str | None) -> None:
    """422 unless the key is absent or 1 to 255 visible ASCII characters."""
    if key is not None and not _IDEMPOTENCY_KEY.match(key):
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            detail="Idempotency-Key: 1 to 255 visible ASCII characters (a UUID, for example)",
        )


def replayed(content: Any, location: str) -> JSONResponse:
    """The answer to a POST whose Idempotency-Key an earlier request made the thing with: 200,
    that thing (``content``: JSON-ready), its Location and Idempotent-Replayed: true."""
    return JSONResponse(
        content, status_code=status.HTTP_200_OK, headers={"Location": location, "Idempotent-Replayed": "true"}
    )

"""Calibration sets over REST: upload a .txt / .jsonl file that jobs name as ``upload:<id>``,
list them (everyone signed in sees every set, with its owner), delete one (its owner or an
admin). The body is read by ``app.services.uploads`` while it streams, under the cap (the
server's, or the uploader's quota left when smaller)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Request, Response, status
from fastapi import Path as PathParam
from pydantic import BaseModel, Field

from app import crud
from app.api.deps import SessionDep, SettingsDep
from app.auth import UserDep
from app.models import CalibrationSet
from app.schemas import CalibrationSetOut
from app.services import upload_store, uploads

router = APIRouter(prefix="/calibration-sets", tags=["calibration sets"])

SetId = Annotated[int, PathParam(ge=1, le=2**31 - 1, description="the calibration set's id (upload:<id>)")]


class CalibrationSetItem(CalibrationSetOut):
    owner: str | None = Field(None, description="who uploaded it (it and admins may delete it)")


class CalibrationSetItems(BaseModel):
    items: list[CalibrationSetItem]


def out(row: CalibrationSet, owner: str | None = None) -> CalibrationSetItem:
    return CalibrationSetItem(
        id=row.id,
        ref=f"upload:{row.id}",
        name=row.name,
        format=row.format,
        size=row.size,
        sha256=row.sha256,
        created_at=row.created_at,
        owner=owner,
    )


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=CalibrationSetItem,
    responses={
        400: {"description": "a malformed multipart body"},
        409: {"description": "the uploader already holds SPARSEGPT_MAX_UPLOADS_PER_USER files"},
        413: {"description": "larger than the upload limit, or than the uploader's quota left"},
        415: {"description": "not multipart/form-data"},
        422: {"description": "not a .txt/.jsonl text file"},
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {"file": {"type": "string", "format": "binary", "description": ".txt or .jsonl"}},
                    }
                }
            },
        }
    },
)
async def upload_calibration_set(
    request: Request, session: SessionDep, settings: SettingsDep, user: UserDep
) -> CalibrationSetItem:
    """Upload a calibration (or evaluation) text file as the multipart field ``file``."""
    received = await uploads.receive(request, settings, file_field="file")
    if received.file is None:
        raise uploads.UploadError(422, "no file: send it in a multipart field named 'file'")
    return out(await upload_store.store(session, settings, received.file, owner_id=user.id), user.name)


@router.get("", response_model=CalibrationSetItems)
def list_calibration_sets(session: SessionDep) -> CalibrationSetItems:
    names = {u.id: u.name for u in crud.list_users(session)}
    return CalibrationSetItems(items=[out(row, names.get(row.owner_id)) for row in crud.list_calibration_sets(session)])


@router.delete(
    "/{set_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses={
        403: {"description": "not yours (its owner or an admin may delete it)"},
        404: {"description": "no such set"},
        409: {"description": "a queued or running job uses it"},
    },
)
def delete_calibration_set(set_id: SetId, session: SessionDep, settings: SettingsDep, user: UserDep) -> Response:
    """Remove a calibration set and its file, unless a queued or running job names it."""
    row = crud.get_calibration_set(session, set_id)
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"calibration set upload:{set_id} not found")
    if not user.may_manage(row.owner_id):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, detail=f"upload:{set_id} is not yours: only its owner or an admin may delete it"
        )
    removal = upload_store.remove(session, settings, set_id)
    if removal.in_use_by:
        jobs = ", ".join(str(j) for j in removal.in_use_by)
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            detail=f"upload:{set_id} is used by queued or running job(s) {jobs}: "
            "cancel them or wait until they finish, then delete it",
        )
    if not removal.deleted:  # deleted meanwhile (another request, the sweeper)
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"calibration set upload:{set_id} not found")
    return Response(status_code=status.HTTP_204_NO_CONTENT)

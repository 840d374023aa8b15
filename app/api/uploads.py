"""Calibration sets over REST: upload a .txt / .jsonl file that jobs name as ``upload:<id>``,
and list them. The body is read by ``app.services.uploads`` while it streams, under the cap."""

from __future__ import annotations

from fastapi import APIRouter, Request, status

from app import crud
from app.api.deps import SessionDep, SettingsDep
from app.auth import UserDep
from app.models import CalibrationSet
from app.schemas import CalibrationSetList, CalibrationSetOut
from app.services import uploads

router = APIRouter(prefix="/calibration-sets", tags=["calibration sets"])


def out(row: CalibrationSet) -> CalibrationSetOut:
    return CalibrationSetOut(
        id=row.id, ref=f"upload:{row.id}", name=row.name, format=row.format, size=row.size,
        sha256=row.sha256, created_at=row.created_at,
    )


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=CalibrationSetOut,
    responses={400: {"description": "a malformed multipart body"}, 413: {"description": "larger than the upload limit"}, 415: {"description": "not multipart/form-data"},
               422: {"description": "not a .txt/.jsonl text file"}},
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
async def upload_calibration_set(request: Request, session: SessionDep, settings: SettingsDep, user: UserDep) -> CalibrationSetOut:
    """Upload a calibration (or evaluation) text file as the multipart field ``file``."""
    received = await uploads.receive(request, settings, file_field="file")
    if received.file is None:
        raise uploads.UploadError(422, "no file: send it in a multipart field named 'file'")
    return out(await uploads.store(session, settings, received.file, owner_id=user.id))


@router.get("", response_model=CalibrationSetList)
def list_calibration_sets(session: SessionDep) -> CalibrationSetList:
    return CalibrationSetList(items=[out(row) for row in crud.list_calibration_sets(session)])

"""Calibration sets: uploaded .txt / .jsonl files that jobs name as ``upload:<id>``.

The body is parsed here, from the raw request stream, so the size cap holds while it streams
(413 as soon as the file passes it) instead of after Starlette has spooled the whole upload.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request, status
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool

from app import crud
from app.api.deps import SessionDep, SettingsDep
from app.auth import UserDep
from app.models import CalibrationSet
from app.schemas import CalibrationSetList, CalibrationSetOut

router = APIRouter(prefix="/calibration-sets", tags=["calibration sets"])

FORMATS = {".txt": "txt", ".jsonl": "jsonl"}
MULTIPART_OVERHEAD = 64 * 1024  # headers, boundaries and small fields around the file


class UploadError(Exception):
    def __init__(self, code: int, detail: str):
        super().__init__(detail)
        self.code, self.detail = code, detail


def out(row: CalibrationSet) -> CalibrationSetOut:
    return CalibrationSetOut(
        id=row.id, ref=f"upload:{row.id}", name=row.name, format=row.format, size=row.size,
        sha256=row.sha256, created_at=row.created_at,
    )


def _safe_name(filename: str) -> str:
    base = filename.replace("\\", "/").rsplit("/", 1)[-1]
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", base).strip("._")[:128] or "upload"


class _FilePart:
    """Collects the multipart part named ``file`` into a temporary file, hashing and counting."""

    def __init__(self, directory: Path, limit: int):
        self.directory, self.limit = directory, limit
        self.headers: dict[str, str] = {}
        self._field = b""
        self._value = b""
        self.in_file = False
        self.found = False
        self.filename = ""
        self.size = 0
        self.sha = hashlib.sha256()
        self.handle = None
        self.path: Path | None = None

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: setattr(self, "_field", self._field + d[s:e]),
            "on_header_value": lambda d, s, e: setattr(self, "_value", self._value + d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._data,
            "on_part_end": self._part_end,
        }

    def _part_begin(self) -> None:
        self.headers, self._field, self._value = {}, b"", b""

    def _header_end(self) -> None:
        self.headers[self._field.decode("latin-1").lower()] = self._value.decode("latin-1")
        self._field, self._value = b"", b""

    def _headers_finished(self) -> None:
        _, params = parse_options_header(self.headers.get("content-disposition", ""))
        name = params.get(b"name", b"").decode("utf-8", "replace")
        self.in_file = name == "file" and not self.found
        if name == "file" and self.found:
            raise UploadError(422, "send one file per upload (one multipart field named 'file')")
        if self.in_file:
            self.found = True
            self.filename = params.get(b"filename", b"").decode("utf-8", "replace")
            suffix = Path(self.filename).suffix.lower()
            if suffix not in FORMATS:
                raise UploadError(
                    422, f"{self.filename or 'the file'!r}: calibration sets are .txt (plain text) or .jsonl (one {{\"text\": ...}} per line)"
                )
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(dir=self.directory, prefix=".upload-", suffix=suffix)
            self.handle = os.fdopen(fd, "wb")
            self.path = Path(name)

    def _data(self, data: bytes, start: int, end: int) -> None:
        if not self.in_file:
            return
        chunk = data[start:end]
        self.size += len(chunk)
        if self.size > self.limit:
            raise UploadError(413, f"the file is larger than this server's upload limit of {self.limit} bytes")
        self.sha.update(chunk)
        self.handle.write(chunk)

    def _part_end(self) -> None:
        if self.in_file and self.handle is not None:
            self.handle.close()
        self.in_file = False

    def discard(self) -> None:
        if self.handle is not None and not self.handle.closed:
            self.handle.close()
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def _check_content(path: Path, fmt: str) -> None:
    """UTF-8 text with something in it; .jsonl: one JSON object with a "text" string per line."""
    texts = 0
    try:
        with path.open("r", encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                if fmt == "jsonl":
                    try:
                        obj = json.loads(line)
                    except ValueError:
                        raise UploadError(422, f"line {number} is not JSON (a .jsonl file holds one {{\"text\": ...}} object per line)") from None
                    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                        raise UploadError(422, f"line {number} has no \"text\" string")
                texts += 1
    except UnicodeDecodeError as err:
        raise UploadError(422, f"the file is not UTF-8 text (byte {err.start})") from None
    if texts == 0:
        raise UploadError(422, "the file holds no text")


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
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, detail="send multipart/form-data with the file in a field named 'file'")
    limit = settings.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + MULTIPART_OVERHEAD:
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, detail=f"the upload is larger than this server's upload limit of {limit} bytes")
    part = _FilePart(settings.uploads_dir, limit)
    parser = MultipartParser(boundary, part.callbacks())
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit + MULTIPART_OVERHEAD:
                raise UploadError(413, f"the upload is larger than this server's upload limit of {limit} bytes")
            parser.write(chunk)
        parser.finalize()
        if not part.found or part.path is None:
            raise UploadError(422, "no file: send it in a multipart field named 'file'")
        if part.handle is not None and not part.handle.closed:
            raise UploadError(422, "the multipart body ended in the middle of the file")
        fmt = FORMATS[part.path.suffix]
        await run_in_threadpool(_check_content, part.path, fmt)
    except UploadError as err:
        part.discard()
        raise HTTPException(err.code, detail=err.detail) from None
    except MultipartParseError as err:
        part.discard()
        raise HTTPException(status.HTTP_400_BAD_REQUEST, detail=f"malformed multipart body: {err}") from None
    except BaseException:
        part.discard()
        raise
    sha = part.sha.hexdigest()
    final = settings.uploads_dir / f"{sha}.{fmt}"  # content-addressed: the name never comes from input
    os.replace(part.path, final)
    row = crud.create_calibration_set(
        session, name=_safe_name(part.filename), format=fmt, size=part.size, sha256=sha, path=str(final), owner_id=user.id
    )
    session.commit()
    return out(row)


@router.get("", response_model=CalibrationSetList)
def list_calibration_sets(session: SessionDep) -> CalibrationSetList:
    return CalibrationSetList(items=[out(row) for row in crud.list_calibration_sets(session)])

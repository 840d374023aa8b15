"""The one upload path: calibration (or evaluation) text files that jobs name as ``upload:<id>``.

The API's ``POST /calibration-sets`` and the dashboard's new-job form both read their body
here, from the raw request stream, so one size cap holds while it streams (413 as soon as the
body passes it, chunked or not) instead of after Starlette has spooled the whole upload. The
file goes to a temporary file beside the uploads, hashed as it arrives; ``store``
(``app.services.upload_store``) checks its content and keeps it content-addressed (the stored
name never comes from input).

Per user (``Quota``): at most settings.max_uploads_per_user files and
settings.upload_quota_bytes_per_user bytes. The quota left is this upload's cap while it
streams (min(max_upload_bytes, quota - used)), and ``upload_store.store`` counts again under
the user's row lock before it keeps the file, so two concurrent uploads cannot both pass.
``upload_store.remove`` deletes a set (DELETE /calibration-sets/{id}, and the sweeper past
settings.upload_retention_s) unless a queued or running job names it.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs

from fastapi import HTTPException, Request
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app import crud
from app.auth import CurrentUser
from app.config import Settings

FORMATS = {".txt": "txt", ".jsonl": "jsonl"}
TEMP_PREFIX = ".upload-"  # a body being received (``_Parts``); kept files are named by their sha256
MULTIPART_OVERHEAD = 64 * 1024  # headers, boundaries and the small fields around the file
MAX_FIELDS = 100  # text fields of a form


class UploadError(HTTPException):
    """A body that cannot be taken, with its status (400, 409, 413, 415, 422) and the reason."""


@dataclass
class Quota:
    """What one user holds (``files``, ``used`` bytes) against the server's per-user limits."""

    settings: Settings
    name: str = ""
    files: int = 0
    used: int = 0

    @property
    def left(self) -> int | None:
        """Bytes of quota left (None: no quota)."""
        quota = self.settings.upload_quota_bytes_per_user
        return max(quota - self.used, 0) if quota > 0 else None

    @property
    def cap(self) -> int:
        """The largest file this user may upload now."""
        left = self.left
        return self.settings.max_upload_bytes if left is None else min(self.settings.max_upload_bytes, left)

    def too_large(self, what: str = "the upload") -> UploadError:
        left = self.left
        if left is None or left >= self.settings.max_upload_bytes:
            return UploadError(
                413,
                f"{what} is larger than this server's upload limit of "
                f"{self.settings.max_upload_bytes} bytes (SPARSEGPT_MAX_UPLOAD_BYTES)",
            )
        return UploadError(
            413,
            f"{what} is larger than the {left} bytes left of {self.name}'s upload quota: "
            f"{self.files} file(s) use {self.used} of {self.settings.upload_quota_bytes_per_user} "
            f"bytes (SPARSEGPT_UPLOAD_QUOTA_BYTES_PER_USER); delete some (DELETE "
            "/api/v1/calibration-sets/{id}) or ask an admin",
        )

    def full(self) -> UploadError | None:
        """The refusal when the user already holds as many files as allowed."""
        limit = self.settings.max_uploads_per_user
        if limit <= 0 or self.files < limit:
            return None
        return UploadError(
            409,
            f"{self.name} has {self.files} uploaded file(s), and this server's limit per user is "
            f"{limit} (SPARSEGPT_MAX_UPLOADS_PER_USER): delete one (DELETE "
            "/api/v1/calibration-sets/{id}) or ask an admin",
        )


def quota_of(session: Session, settings: Settings, user_id: int | None, name: str | None = None) -> Quota:
    if user_id is None:
        return Quota(settings, name or "this user")
    if name is None:
        user = crud.get_user(session, user_id)
        name = user.name if user is not None else f"user {user_id}"
    files, used = crud.upload_usage(session, owner_id=user_id)
    return Quota(settings, name, files, used)


def _load_quota(sessions, settings: Settings, user: CurrentUser | None) -> Quota:
    if user is None:
        return Quota(settings)
    with sessions() as session:
        return quota_of(session, settings, user.id, user.name)


def safe_name(filename: str) -> str:
    base = filename.replace("\\", "/").rsplit("/", 1)[-1]
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", base).strip("._")[:128] or "upload"


@dataclass
class ReceivedFile:
    """A file part written to a temporary file (``discard`` it, or ``store`` it)."""

    filename: str
    path: Path
    size: int = 0
    sha: hashlib._Hash = field(default_factory=hashlib.sha256)

    @property
    def format(self) -> str:
        return FORMATS[self.path.suffix]

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)


@dataclass
class Received:
    """A parsed body: its text fields (in order, repeated names kept) and the file, if any."""

    fields: dict[str, list[str]] = field(default_factory=dict)
    file: ReceivedFile | None = None

    def get(self, name: str) -> str | None:
        values = self.fields.get(name)
        return values[0] if values else None

    def getlist(self, name: str) -> list[str]:
        return list(self.fields.get(name, []))


class _Parts:
    """python-multipart callbacks: text fields into memory (capped), the file part to disk."""

    def __init__(self, directory: Path, quota: Quota, file_field: str):
        self.directory, self.quota, self.file_field = directory, quota, file_field
        self.limit = quota.cap
        self.received = Received()
        self.headers: dict[str, str] = {}
        self._header = [b"", b""]
        self.name: str | None = None  # the current part's field name
        self.value = bytearray()
        self.handle = None
        self.text_bytes = 0

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: self._header.__setitem__(0, self._header[0] + d[s:e]),
            "on_header_value": lambda d, s, e: self._header.__setitem__(1, self._header[1] + d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._data,
            "on_part_end": self._part_end,
        }

    def _part_begin(self) -> None:
        self.headers, self._header, self.name, self.value = {}, [b"", b""], None, bytearray()

    def _header_end(self) -> None:
        self.headers[self._header[0].decode("latin-1").lower()] = self._header[1].decode("latin-1")
        self._header = [b"", b""]

    def _headers_finished(self) -> None:
        _, params = parse_options_header(self.headers.get("content-disposition", ""))
        self.name = params.get(b"name", b"").decode("utf-8", "replace")
        filename = params.get(b"filename")
        if filename is None:
            return
        filename = filename.decode("utf-8", "replace")
        if self.name != self.file_field:
            raise UploadError(
                422,
                f"{self.name[:40]!r} is not the file field: send the file in a multipart "
                f"field named {self.file_field!r}",
            )
        if self.received.file is not None:
            raise UploadError(422, f"send one file per upload (one multipart field named {self.file_field!r})")
        if not filename:  # a form's empty file input
            self.name = None
            return
        suffix = Path(filename).suffix.lower()
        if suffix not in FORMATS:
            raise UploadError(
                422, f'{filename!r}: calibration sets are .txt (plain text) or .jsonl (one {{"text": ...}} per line)'
            )
        full = self.quota.full()
        if full is not None:
            raise full
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self.directory, prefix=TEMP_PREFIX, suffix=suffix)
        self.handle = os.fdopen(fd, "wb")
        self.received.file = ReceivedFile(filename=filename, path=Path(name))

    def _data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self.handle is not None:
            file = self.received.file
            file.size += len(chunk)
            if file.size > self.limit:
                raise self.quota.too_large("the file")
            file.sha.update(chunk)
            self.handle.write(chunk)
        elif self.name is not None:
            self.text_bytes += len(chunk)
            if self.text_bytes > MULTIPART_OVERHEAD:
                raise UploadError(413, f"the form's text fields are larger than {MULTIPART_OVERHEAD} bytes")
            self.value += chunk

    def _part_end(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None
        elif self.name is not None:
            if sum(map(len, self.received.fields.values())) >= MAX_FIELDS:
                raise UploadError(413, f"more than {MAX_FIELDS} form fields")
            self.received.fields.setdefault(self.name, []).append(self.value.decode("utf-8", "replace"))
        self.name = None

    def discard(self) -> None:
        if self.handle is not None and not self.handle.closed:
            self.handle.close()
        if self.received.file is not None:
            self.received.file.discard()


async def receive(request: Request, settings: Settings, *, file_field: str, form: bool = False) -> Received:
    """Read a multipart body under the upload cap: the server's, or the signed-in user's quota
    left when smaller (a ``form`` may also come url-encoded, or empty: no fields at all, so no
    content type)."""
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    quota = await run_in_threadpool(
        _load_quota, request.app.state.sessions, settings, getattr(request.state, "user", None)
    )
    limit = quota.cap
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + MULTIPART_OVERHEAD:
        raise quota.too_large()
    if form and (declared == "0" or content_type == b"application/x-www-form-urlencoded"):
        return Received(fields=await _urlencoded(request))  # an empty body is an empty form
    boundary = params.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise UploadError(415, f"send multipart/form-data with the file in a field named {file_field!r}")
    parts = _Parts(settings.uploads_dir, quota, file_field)
    parser = MultipartParser(boundary, parts.callbacks())
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit + MULTIPART_OVERHEAD:
                raise quota.too_large()
            parser.write(chunk)
        parser.finalize()
        if parts.handle is not None:
            raise UploadError(422, "the multipart body ended in the middle of the file")
    except MultipartParseError as err:
        parts.discard()
        raise UploadError(400, f"malformed multipart body: {err}") from None
    except OSError as err:  # the temp file: a full disk (ENOSPC), a quota, a read-only mount
        parts.discard()
        raise UploadError(
            507, f"the upload could not be written on this server: {getattr(err, 'strerror', None) or err}"
        ) from None
    except BaseException:
        parts.discard()
        raise
    return parts.received


async def _urlencoded(request: Request) -> dict[str, list[str]]:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MULTIPART_OVERHEAD:
            raise UploadError(413, f"the form is larger than {MULTIPART_OVERHEAD} bytes")
    try:
        return parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=MAX_FIELDS)
    except (UnicodeDecodeError, ValueError) as err:
        raise UploadError(400, f"malformed form: {err}") from None

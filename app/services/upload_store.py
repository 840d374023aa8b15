"""Keeping and removing uploaded files: the end of the upload path of ``app.services.uploads``.

``store`` checks a received file's content (``check_content``) and keeps it as a calibration
set, content-addressed in the artifact store, counted against its owner's quota again under
the owner's row lock. ``remove`` deletes a set unless a queued or running job names it, and
``remove_stale_temps`` deletes the temp files an API killed mid-upload left behind.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app import crud, storage
from app.config import Settings
from app.models import CalibrationSet
from app.services.uploads import TEMP_PREFIX, ReceivedFile, UploadError, quota_of, safe_name

TEMP_MAX_AGE_S = 3600.0  # a temp file unwritten this long is left over (the API killed mid-upload)


def check_content(path: Path, fmt: str) -> None:
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
                        raise UploadError(
                            422, f'line {number} is not JSON (a .jsonl file holds one {{"text": ...}} object per line)'
                        ) from None
                    except RecursionError:  # json.loads recurses once per [ or {
                        raise UploadError(
                            422,
                            f"line {number} is nested too deeply (a .jsonl file holds one flat "
                            '{"text": ...} object per line)',
                        ) from None
                    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                        raise UploadError(422, f'line {number} has no "text" string')
                texts += 1
    except UnicodeDecodeError as err:
        raise UploadError(422, f"the file is not UTF-8 text (byte {err.start})") from None
    if texts == 0:
        raise UploadError(422, "the file holds no text")


async def store(session: Session, settings: Settings, file: ReceivedFile, *, owner_id: int | None) -> CalibrationSet:
    """Check a received file's content and keep it as a calibration set (content-addressed),
    counted against its owner's quota again under the owner's row lock (a concurrent upload of
    the same user may have been kept since this one started): refused (409, 413) and discarded
    when it no longer fits."""
    try:
        await run_in_threadpool(check_content, file.path, file.format)
        return await run_in_threadpool(_keep, session, settings, file, owner_id)
    except BaseException:
        file.discard()
        raise


def _keep(session: Session, settings: Settings, file: ReceivedFile, owner_id: int | None) -> CalibrationSet:
    if owner_id is not None:
        crud.lock_user(session, owner_id)  # until the commit: the user's other uploads wait
        quota = quota_of(session, settings, owner_id)
        refusal = quota.full() or (quota.too_large("the file") if file.size > quota.cap else None)
        if refusal is not None:
            session.rollback()
            raise refusal
    sha = file.sha.hexdigest()
    store = storage.get_store(settings)
    name = f"uploads/{sha}.{file.format}"  # content-addressed: sets of the same content share it
    row = crud.create_calibration_set(
        session,
        name=safe_name(file.filename),
        format=file.format,
        size=file.size,
        sha256=sha,
        path=store.location(name),
        owner_id=owner_id,
    )
    session.commit()  # before the file is in place: a concurrent ``remove`` of a twin then keeps it
    try:
        with store.locked():
            store.put_file(name, file.path)
        file.discard()  # moved or uploaded: no copy stays here
    except (OSError, storage.StorageError) as err:
        crud.delete_calibration_set(session, set_id=row.id)
        session.commit()
        raise UploadError(507, f"the file could not be stored: {getattr(err, 'strerror', None) or err}") from None
    return row


def remove_stale_temps(directory: Path, max_age_s: float = TEMP_MAX_AGE_S) -> list[str]:
    """Delete the ``.upload-*`` temp files of ``directory`` not written for ``max_age_s`` (an API
    process killed mid-upload leaves its file; a live upload writes as it reads, and the server's
    read timeouts end a stalled one long before); the names removed."""
    removed: list[str] = []
    cutoff = time.time() - max_age_s
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return removed
    for entry in entries:
        if not entry.name.startswith(TEMP_PREFIX) or not entry.is_file(follow_symlinks=False):
            continue
        try:
            if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                os.unlink(entry.path)
                removed.append(entry.name)
        except FileNotFoundError:  # another sweeper, or the upload finished meanwhile
            continue
    return removed


@dataclass
class Removal:
    deleted: bool = False
    in_use_by: list[int] = field(default_factory=list)  # queued or running jobs naming it


def remove(session: Session, settings: Settings, set_id: int) -> Removal:
    """Delete a calibration set and its file unless a queued or running job names it. The row
    goes first (a compare-and-set: one of several sweepers wins), the file once no set names it."""
    path = crud.delete_calibration_set(session, set_id=set_id)
    if path is None:
        session.rollback()
        return Removal()
    users = crud.uploads_in_use(session).get(set_id, [])
    if users:
        session.rollback()
        return Removal(in_use_by=users)
    session.commit()
    store = storage.get_store(settings)
    with store.locked():
        if not crud.calibration_path_in_use(session, path):
            store.delete(path)  # only a location of the store's own (a row never names another)
        session.rollback()  # the read's transaction
    return Removal(deleted=True)

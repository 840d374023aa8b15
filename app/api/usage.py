"""Who am I, and how much of the shared disk the jobs use (for the dashboard)."""

from __future__ import annotations

import shutil
from pathlib import Path

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from app import crud
from app.api.deps import SessionDep, SettingsDep
from app.auth import UserDep
from app.schemas import DiskOut, UsageOut, UserOut, UserUsageOut

router = APIRouter(tags=["account"])


@router.get("/me", response_model=UserOut)
def me(user: UserDep) -> UserOut:
    """The signed-in user (the built-in local admin in single-user mode)."""
    return UserOut(name=user.name, is_admin=user.is_admin, local=user.local)


def dir_size(root: Path) -> int:
    total = 0
    if not root.is_dir():
        return 0
    for path in root.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink():
                total += path.stat().st_size
        except OSError:  # removed while we walked
            pass
    return total


@router.get("/usage", response_model=UsageOut)
async def usage(session: SessionDep, settings: SettingsDep, user: UserDep) -> UsageOut:
    """Disk use of the data directory, artifacts and uploads; jobs and artifact bytes per user."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    disk = shutil.disk_usage(settings.data_dir)
    artifacts = await run_in_threadpool(dir_size, settings.artifacts_dir)
    uploads = await run_in_threadpool(dir_size, settings.uploads_dir)
    rows = await run_in_threadpool(crud.usage_by_user, session)
    users = [UserUsageOut(user=name, active_jobs=a, jobs=n, artifact_bytes=b) for name, a, n, b in rows]
    you = next(
        (u for u in users if u.user == user.name), UserUsageOut(user=user.name, active_jobs=0, jobs=0, artifact_bytes=0)
    )
    return UsageOut(
        disk=DiskOut(
            path=str(settings.data_dir),
            total_bytes=disk.total,
            used_bytes=disk.used,
            free_bytes=disk.free,
            min_free_bytes=settings.min_free_disk_mb * 1024 * 1024,
        ),
        artifacts_bytes=artifacts,
        uploads_bytes=uploads,
        artifact_retention_s=settings.artifact_retention_s,
        max_active_jobs_per_user=settings.max_active_jobs_per_user,
        you=you,
        users=users,
    )

"""GET /api/v1/workers: each worker seen recently, what it runs on (GPU name and memory, or CPU
only), the queues it consumes, the jobs it runs now and how long ago it was last seen."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, status
from pydantic import BaseModel, Field

from app.api.deps import RedisDep, SessionDep
from app.workers import live_workers, running_jobs_by_worker

router = APIRouter(tags=["workers"])


class GpuOut(BaseModel):
    index: str | None = None
    name: str
    memory_gb: float


class WorkerInfo(BaseModel):
    name: str
    pid: int | None = None
    queues: list[str] = Field(default_factory=list)
    device: str | None = Field(None, description="the engine's device setting on that worker (auto, cpu, cuda:N)")
    gpus: list[GpuOut] = Field(default_factory=list, description="empty: CPU only")
    gpu_count: int = 0
    memory_gb: float | None = Field(None, description="GPU memory a job gets there (GB); null: CPU only")
    current_jobs: list[int] = Field(default_factory=list, description="ids of the jobs it runs now")
    seen_s_ago: float = Field(description="seconds since its last heartbeat")
    clock_skew_s: float | None = Field(None, description="its clock minus the server's (Redis TIME); null: unknown")


class WorkerList(BaseModel):
    items: list[WorkerInfo]


def workers_view(r, session) -> list[WorkerInfo]:
    found = live_workers(r)
    running = running_jobs_by_worker(session)
    return [
        WorkerInfo(
            name=str(w.get("name", "?")),
            pid=w.get("pid"),
            queues=list(w.get("queues") or []),
            device=w.get("device"),
            gpus=[
                GpuOut(
                    index=str(g.get("index")) if g.get("index") is not None else None,
                    name=str(g.get("name", "?")),
                    memory_gb=float(g.get("memory_gb") or 0),
                )
                for g in w.get("gpus") or []
            ],
            gpu_count=int(w.get("gpu_count") or 0),
            memory_gb=w.get("memory_gb"),
            current_jobs=running.get(str(w.get("name")), []),
            seen_s_ago=w["seen_s_ago"],
            clock_skew_s=w.get("clock_skew_s"),
        )
        for w in found
    ]


@router.get("/workers", response_model=WorkerList, responses={503: {"description": "Redis is unreachable"}})
def list_workers(r: RedisDep, session: SessionDep) -> WorkerList:
    """Workers whose registration (refreshed every few seconds) is alive, by name."""
    import redis

    try:
        return WorkerList(items=workers_view(r, session))
    except redis.RedisError as err:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail=f"Redis is unreachable: {err}") from None

"""Compression plans as the API, the dashboard and the sweeper see them: create, read, list, lock,
save their points and status; a plan's jobs; and the jobs' plan columns (plan_id, priority).

A plan's points are one JSON column, changed only under the plan's row lock (``lock_plan``), and
always assigned a new list (SQLAlchemy does not see changes made inside a JSON value).
"""

from __future__ import annotations

import copy
from datetime import datetime
from typing import Any

from sqlalchemy import and_, exists, func, select, update
from sqlalchemy.orm import Session, selectinload

from app.models import FAILED, QUEUED, RUNNING, SUCCEEDED, Job, Plan, utcnow

ACTIVE = (QUEUED, RUNNING)


def create_plan(
    session: Session,
    *,
    owner_id: int | None,
    name: str | None,
    model: str,
    base: dict[str, Any],
    mode: str,
    budget: dict[str, Any] | None,
    points: list[dict[str, Any]],
    priority: str,
    idempotency_key: str | None = None,
    body_sha256: str | None = None,
) -> Plan:
    plan = Plan(
        owner_id=owner_id,
        name=name,
        model=model,
        base=base,
        mode=mode,
        budget=budget,
        points=copy.deepcopy(points),
        priority=priority,
        status=QUEUED,
        cancel_requested=False,
        idempotency_key=idempotency_key,
        body_sha256=body_sha256,
        created_at=utcnow(),
    )
    session.add(plan)
    session.flush()
    return plan


def get_plan(session: Session, plan_id: int) -> Plan | None:
    return session.scalars(select(Plan).where(Plan.id == plan_id)).unique().one_or_none()


def get_plan_by_idempotency_key(session: Session, *, owner_id: int, key: str) -> Plan | None:
    query = select(Plan).where(Plan.owner_id == owner_id, Plan.idempotency_key == key)
    return session.scalars(query).unique().one_or_none()


def lock_plan(session: Session, plan_id: int) -> Plan | None:
    """The plan read afresh under its row lock, held until the transaction ends (a no-op UPDATE:
    the row lock on PostgreSQL, the write lock on SQLite), so two advancers never both queue a point."""
    session.execute(update(Plan).where(Plan.id == plan_id).values(status=Plan.status))
    query = select(Plan).where(Plan.id == plan_id).execution_options(populate_existing=True)
    return session.scalars(query).unique().one_or_none()


def save_plan(
    session: Session,
    plan: Plan,
    *,
    points: list[dict[str, Any]] | None = None,
    status: str | None = None,
    cancel_requested: bool | None = None,
    finished_at: datetime | None = None,
) -> None:
    """Set what is given (points as a new list); ``finished_at`` is cleared when the status is active."""
    if points is not None:
        plan.points = copy.deepcopy(points)
    if status is not None:
        plan.status = status
        plan.finished_at = None if status in ACTIVE else (finished_at or plan.finished_at or utcnow())
    if cancel_requested is not None:
        plan.cancel_requested = cancel_requested
    session.flush()


def list_plans(session: Session, *, owner_id: int | None, limit: int = 20, offset: int = 0) -> tuple[list[Plan], int]:
    """Newest first; ``owner_id`` None: everyone's."""
    query = select(Plan).order_by(Plan.id.desc())
    count = select(func.count()).select_from(Plan)
    if owner_id is not None:
        query, count = query.where(Plan.owner_id == owner_id), count.where(Plan.owner_id == owner_id)
    return list(session.scalars(query.limit(limit).offset(offset)).unique().all()), session.scalar(count) or 0


def plan_jobs(session: Session, plan_id: int) -> list[Job]:
    """Every job of the plan (retries included), oldest first, with metrics and artifacts."""
    query = (
        select(Job)
        .where(Job.plan_id == plan_id)
        .options(selectinload(Job.metrics), selectinload(Job.artifacts))
        .order_by(Job.id)
        .execution_options(populate_existing=True)
    )
    return list(session.scalars(query).unique().all())


def plans_to_advance(session: Session, limit: int = 200) -> list[int]:
    """Ids of the plans the sweeper advances: queued or running ones, and finished (not cancelled)
    ones one of whose jobs is active again (retried from the job's page)."""
    active_job = exists().where(and_(Job.plan_id == Plan.id, Job.status.in_(ACTIVE)))
    query = (
        select(Plan.id)
        .where(Plan.status.in_(ACTIVE) | (Plan.status.in_((SUCCEEDED, FAILED)) & active_job))
        .order_by(Plan.id)
        .limit(limit)
    )
    return [row for row in session.scalars(query)]


def mark_plan_job(session: Session, job: Job, *, plan_id: int | None, priority: int | None) -> None:
    """A new job row's plan and message priority (before its commit)."""
    job.plan_id = plan_id
    job.priority = priority
    session.flush()

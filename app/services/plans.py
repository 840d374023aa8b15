"""Compression plans: the one way each thing is done to a plan, for the API, the dashboard, the
CLI's server side and the sweeper. A plan is a group of ordinary jobs (each with its own page,
artifact, retry and cancel) over a grid of settings or a budget search (app/plan_schemas.py).

- ``create``: the points expanded (app/services/plan_points.py), every point's job spec checked
  against the spec and the server (``check_spec``, N:M widths included) and every problem listed
  in ONE 422 before anything is written; more job points than SPARSEGPT_MAX_JOBS_PER_PLAN: 422;
  then the plan row, then ``advance``.
- ``advance``: the ONE place a plan's jobs are made, under the user's and the plan's row locks.
  A grid queues its pending points in order while the user has fewer active jobs than
  SPARSEGPT_MAX_ACTIVE_JOBS_PER_USER (0: no cap); a budget runs one job at a time, in order of
  size, skipping what a missed point rules out. It runs after create, in every sweeper round (for
  plans not finished, or finished with a job active again), and after a plan's job is retried or
  cancelled through the API. A point's job that was retried is followed to the retry.
- Dense figures are measured once: the first job carries ``evaluation.dense`` (perplexity and
  zero-shot); a later job carries it only when no dense figures exist and no job carrying it is
  active or succeeded (the carrier failed).
- A job whose message cannot be sent stays queued: the sweeper sends it (unlike a person's POST,
  nobody is waiting to send it again).
- Status: queued until a job starts; running; succeeded once nothing is pending or active (failed
  jobs shown on the page), failed when no job succeeded; cancelled after ``cancel``.
- ``cancel``: the owner or an admin; pending points skipped ("plan cancelled"), queued jobs
  cancelled, running ones asked to stop.
- Reading: any signed-in user may read any plan (as any job); the list is the user's own.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

import redis
from fastapi import HTTPException, status
from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import crud
from app.auth import CurrentUser
from app.config import Settings
from app.models import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, Plan
from app.plan_schemas import PlanIn
from app.queue import PRIORITIES, enqueue_job
from app.services import jobs as job_service
from app.services.plan_points import JOB, PENDING, SKIPPED, base_spec, expand, job_spec, label, skip_after_miss
from app.services.plan_view import (
    budget_limit,
    compare_to_dense,
    current_jobs,
    dense_figures,
    live_status,
    point_row,
    table_csv,
    view,
    within,
)
from app.services.specs import SpecError, check_spec
from worker.engine.contract.spec import JobSpec

log = logging.getLogger(__name__)
ACTIVE = (QUEUED, RUNNING)
__all__ = ["advance", "cancel", "create", "get_or_404", "list_plans", "plan_json", "submit", "table_csv", "view"]


def plan_url(plan_id: int) -> str:
    return f"/api/v1/plans/{plan_id}"


def get_or_404(session: Session, plan_id: int) -> Plan:
    plan = crud.get_plan(session, plan_id)
    if plan is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"plan {plan_id} not found")
    return plan


def plan_json(session: Session, plan: Plan) -> dict[str, Any]:
    """The plan's JSON (``plan_view.view``) with its jobs read now."""
    return view(plan, crud.plan_jobs(session, plan.id))


def list_plans(session: Session, user: CurrentUser | None, *, limit: int = 20, offset: int = 0):
    """(the user's plans newest first, their total); everyone's in single-user mode (user None)."""
    return crud.list_plans(session, owner_id=user.id if user is not None else None, limit=limit, offset=offset)


# --- create ------------------------------------------------------------------------------------


@dataclass
class Created:
    plan: Plan
    replayed: bool = False  # an earlier request with the same Idempotency-Key made it


def body_digest(body: PlanIn) -> str:
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _replayed(existing: Plan, digest: str, key: str) -> Created:
    if existing.body_sha256 != digest:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            detail=f"Idempotency-Key {key!r} was already used for plan {existing.id} with a different body; "
            "send the same body to get that plan again, or use a new key for a new plan",
        )
    return Created(existing, replayed=True)


def _messages(err: Exception) -> list[tuple[tuple, str]]:
    """(loc without "body", message) of a spec's refusal."""
    if isinstance(err, SpecError):
        return [(tuple(e["loc"][1:]), e["msg"]) for e in err.errors]
    assert isinstance(err, ValidationError)
    return [(tuple(e["loc"]), e["msg"].removeprefix("Value error, ")) for e in err.errors(include_input=False)]


def check_points(session: Session, settings: Settings, body: PlanIn, points: list[dict[str, Any]]) -> None:
    """SpecError listing every setting the model or the server cannot take: a problem every point
    shares once, at its own place; the others once per message, naming the points it concerns."""
    mode, base = ("grid" if body.grid is not None else "budget"), base_spec(body)
    found: dict[tuple, list[str]] = {}
    checked = [p for p in points if p["state"] == PENDING]
    for point in checked:
        try:
            check_spec(JobSpec.model_validate(job_spec(base, point, dense=True)), settings, session, whole_nm=True)
        except (ValidationError, SpecError) as err:
            for loc, msg in _messages(err):
                found.setdefault((loc, msg), []).append(label(point, body.group_size))
    errors = []
    for (loc, msg), labels in found.items():
        if len(labels) == len(checked) and len(checked) > 1:
            errors.append({"type": "value_error", "loc": ["body", *loc], "msg": msg})
        else:
            errors.append({"type": "value_error", "loc": ["body", mode, *loc], "msg": f"{'; '.join(labels)}: {msg}"})
    if errors:
        raise SpecError(errors)


def _refuse(msg: str, loc: tuple = ()) -> SpecError:
    return SpecError([{"type": "value_error", "loc": ["body", *loc], "msg": msg}])


def submit(
    session: Session,
    settings: Settings,
    user: CurrentUser,
    body: PlanIn,
    *,
    idempotency_key: str | None = None,
    send=enqueue_job,
) -> Created:
    """Check, write and start a plan (``create`` with the Idempotency-Key's replay)."""
    digest = body_digest(body)
    if idempotency_key is not None:
        existing = crud.get_plan_by_idempotency_key(session, owner_id=user.id, key=idempotency_key)
        if existing is not None:
            return _replayed(existing, digest, idempotency_key)
    points = expand(body)
    mode = "grid" if body.grid is not None else "budget"
    jobs = sum(1 for p in points if p["state"] == PENDING)
    if jobs == 0:
        raise _refuse("the plan holds only the dense model: add a sparsity above 0 or a quantization scheme", (mode,))
    cap = settings.max_jobs_per_plan
    if 0 < cap < jobs:
        raise _refuse(
            f"the plan has {jobs} settings to run (jobs), above this server's limit of {cap} per plan "
            "(SPARSEGPT_MAX_JOBS_PER_PLAN): try fewer sparsities, methods, schemes or refit values",
            (mode,),
        )
    check_points(session, settings, body, points)
    crud.lock_user(session, user.id)
    try:
        plan = crud.create_plan(
            session,
            owner_id=user.id,
            name=body.name,
            model=body.model,
            base=base_spec(body),
            mode=mode,
            budget=body.budget.as_json() if body.budget is not None else None,
            points=points,
            priority=body.priority,
            idempotency_key=idempotency_key,
            body_sha256=digest,
        )
        session.commit()
    except IntegrityError:  # a twin request with the same key committed first
        session.rollback()
        existing = crud.get_plan_by_idempotency_key(session, owner_id=user.id, key=idempotency_key or "")
        if existing is None:
            raise
        return _replayed(existing, digest, idempotency_key or "")
    return Created(advance(session, settings, plan.id, send=send) or plan)


def create(session: Session, settings: Settings, user: CurrentUser, body: PlanIn, *, send=enqueue_job) -> Plan:
    """The plan, checked, written and started (its first jobs queued). SpecError: 422."""
    return submit(session, settings, user, body, send=send).plan


# --- advance -----------------------------------------------------------------------------------


def _needs_dense(jobs: list, dataset: str | None) -> bool:
    """No dense figures yet, and no job measuring them is active or has succeeded."""
    if dense_figures(jobs, dataset)["job_id"] is not None:
        return False
    return not any(
        ((j.spec or {}).get("evaluation") or {}).get("dense") and j.status in (*ACTIVE, SUCCEEDED) for j in jobs
    )


def _judge(plan: Plan, points: list[dict[str, Any]], jobs: list, dataset: str | None) -> None:
    """A budget's finished jobs against it: a miss skips the points it rules out."""
    limit = budget_limit(plan.budget)
    dense = dense_figures(jobs, dataset)
    linked = current_jobs(points, jobs)
    for point in points:
        job = linked.get(point["key"])
        if point["state"] != JOB or job is None or job.status != SUCCEEDED:
            continue
        row = point_row(point, job, dataset)
        compare_to_dense(row, dense, dataset)
        if within(row, *limit) is False:
            skip_after_miss(points, point, plan.base.get("dtype", "auto"))


def _status(plan: Plan, points: list[dict[str, Any]], jobs_by_id: dict) -> str:
    rows = [point_row(p, jobs_by_id.get(p["job_id"]) if p["state"] == JOB else None, None) for p in points]
    return live_status(plan, rows)


def _make_job(session: Session, settings: Settings, plan: Plan, point: dict[str, Any], dense: bool):
    """The job row of one point (None, and the point skipped with the reason, when its spec is refused now)."""
    spec = job_spec(plan.base, point, dense=dense)
    try:
        parsed = JobSpec.model_validate(spec)
        checked = check_spec(parsed, settings, session, whole_nm=True)
    except (ValidationError, SpecError) as err:
        point["state"], point["reason"] = SKIPPED, "refused when queued: " + "; ".join(m for _, m in _messages(err))
        return None
    job = crud.create_job(
        session,
        spec=checked.data,
        owner_id=plan.owner_id,
        queue=checked.queue,
        spec_sha256=job_service.spec_digest(parsed),
    )
    crud.mark_plan_job(session, job, plan_id=plan.id, priority=PRIORITIES.get(plan.priority))
    point["state"], point["job_id"] = JOB, job.id
    return job


def advance(session: Session, settings: Settings, plan: Plan | int, *, send=enqueue_job) -> Plan | None:
    """Queue what may run now, judge a budget's finished jobs, keep the status current (see the
    module's docstring); the plan afresh (None when it is gone). Commits."""
    plan_id = plan if isinstance(plan, int) else plan.id
    session.rollback()  # a fresh transaction: the locks below are held until the commit
    row = crud.get_plan(session, plan_id)
    if row is None:
        return None
    if row.owner_id is not None:
        crud.lock_user(session, row.owner_id)  # the user's cap counts what this queues
    plan = crud.lock_plan(session, plan_id)
    if plan is None:
        session.rollback()
        return None
    jobs = crud.plan_jobs(session, plan_id)
    points = json.loads(json.dumps(plan.points))
    for key, job in current_jobs(points, jobs).items():  # a retried job: its point names the retry
        next(p for p in points if p["key"] == key)["job_id"] = job.id
    by_id = {j.id: j for j in jobs}
    dataset = next(iter((plan.base.get("evaluation") or {}).get("datasets") or []), None)
    made = []
    if not plan.cancel_requested:
        if plan.mode == "budget":
            _judge(plan, points, jobs, dataset)
        active = sum(1 for p in points if p["state"] == JOB and by_id[p["job_id"]].status in ACTIVE)
        cap = settings.max_active_jobs_per_user
        room = cap - crud.count_active_jobs(session, owner_id=plan.owner_id) if cap > 0 and plan.owner_id else 10**6
        if plan.mode == "budget":
            room = min(room, 0 if active else 1)
        dense = _needs_dense(jobs, dataset)
        for point in points:
            if room <= 0:
                break
            if point["state"] != PENDING:
                continue
            job = _make_job(session, settings, plan, point, dense)
            if job is not None:
                made.append(job)
                by_id[job.id] = job
                dense, room = False, room - 1
    new_status = _status(plan, points, by_id)
    if points != plan.points or new_status != plan.status:
        crud.save_plan(session, plan, points=points, status=new_status)
    session.commit()  # the worker must find the rows: send only after the commit
    for job in made:
        _send(session, settings, job, send)
    return plan


def _send(session: Session, settings: Settings, job, send) -> None:
    try:
        task_id = send(settings, job.id, queue=job.queue, priority=job.priority)
    except Exception as err:  # noqa: BLE001 (kombu/redis errors): the sweeper sends it
        log.warning("plan job %s: could not send its run message (%s); the sweeper will", job.id, err)
        return
    crud.set_task_id(session, job_id=job.id, task_id=task_id)
    session.commit()


# --- cancel ------------------------------------------------------------------------------------


def cancel(session: Session, settings: Settings, r: redis.Redis, user: CurrentUser | None, plan_id: int) -> Plan:
    """404 / 403 (owner or admin) / 409 (finished); then its pending points are skipped, its
    queued jobs cancelled and its running ones asked to stop (``services.jobs.cancel``)."""
    plan = get_or_404(session, plan_id)
    if user is not None and not user.may_manage(plan.owner_id):
        owner = plan.owner.name if plan.owner else "nobody (its owner was removed)"
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            detail=f"plan {plan_id} belongs to {owner}; only its owner or an admin may cancel it",
        )
    jobs = crud.plan_jobs(session, plan_id)
    active = [j.id for j in jobs if j.status in ACTIVE]
    now = view(plan, jobs)["status"]  # as the jobs are now (the stored status lags a sweeper round)
    if now in (SUCCEEDED, FAILED, CANCELLED) and not active:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=f"plan {plan_id} is already {now}")
    plan = crud.lock_plan(session, plan_id)
    points = json.loads(json.dumps(plan.points))
    for point in points:
        if point["state"] == PENDING:
            point["state"], point["reason"] = SKIPPED, "plan cancelled"
    crud.save_plan(session, plan, points=points, status=CANCELLED, cancel_requested=True)
    session.commit()
    for job_id in active:
        try:
            job_service.cancel(session, settings, r, user, job_id)
        except HTTPException:  # deleted meanwhile
            continue
    return crud.get_plan(session, plan_id)


def job_changed(session: Session, settings: Settings, plan_id: int | None, *, send=enqueue_job) -> None:
    """After one of a plan's jobs was retried or cancelled: the plan advanced at once (the sweeper would)."""
    if plan_id is None:
        return
    try:
        advance(session, settings, plan_id, send=send)
    except Exception:  # noqa: BLE001 (the job's own change stands; the sweeper advances the plan)
        session.rollback()
        log.exception("plan %s: could not advance after a change to one of its jobs", plan_id)


# ``list`` is the design's name for ``list_plans`` (kept for callers; this module calls no builtin list()).
list = list_plans  # noqa: A001

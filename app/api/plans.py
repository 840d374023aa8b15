"""Compression plans over REST: submit, list, read, cancel, and the table as CSV. The routes parse
and render; ``app.services.plans`` does the work (and ``plan_view.view`` makes the JSON)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Response, status
from fastapi import Path as PathParam

from app.api.deps import RedisDep, SessionDep, SettingsDep, check_idempotency_key, idempotency_key_header, replayed
from app.auth import UserDep
from app.plan_schemas import PlanIn, PlanList, PlanOut, PlanSummary
from app.services import plans
from app.services.plan_view import table_csv
from app.services.specs import SpecError

router = APIRouter(prefix="/plans", tags=["plans"])

NOT_FOUND = {404: {"description": "no such plan"}}
IdempotencyKey = idempotency_key_header("plan")
PlanId = Annotated[int, PathParam(ge=1, le=2**31 - 1, description="the plan's id")]


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=PlanOut,
    responses={
        200: {"model": PlanOut, "description": "the plan an earlier request with this Idempotency-Key made"},
        422: {
            "description": "an invalid body; settings the model or the server cannot take (every one named, "
            "nothing queued); more jobs than the server's limit per plan; an Idempotency-Key reused with "
            "another body"
        },
    },
)
def submit_plan(
    body: PlanIn,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    user: UserDep,
    idempotency_key: IdempotencyKey = None,
) -> Any:
    """Start a compression plan: a grid of settings, or a budget searched in order of size. Its jobs
    are queued as the user's cap on active jobs allows. 201 with the plan and its Location."""
    check_idempotency_key(idempotency_key)
    try:
        created = plans.submit(session, settings, user, body, idempotency_key=idempotency_key)
    except SpecError as err:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=err.errors) from None
    data = plans.plan_json(session, created.plan)
    location = plans.plan_url(created.plan.id)
    if created.replayed:
        return replayed(PlanOut.model_validate(data).model_dump(mode="json"), location)
    response.headers["Location"] = location
    return data


@router.get("", response_model=PlanList)
def list_plans(
    session: SessionDep,
    user: UserDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 20,
    offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
) -> PlanList:
    """The signed-in user's plans, newest first."""
    rows, total = plans.list_plans(session, user, limit=limit, offset=offset)
    items = [
        PlanSummary(
            id=p.id,
            url=f"/plans/{p.id}",
            api_url=plans.plan_url(p.id),
            name=p.name,
            model=p.model,
            mode=p.mode,
            priority=p.priority,
            status=p.status,
            points=sum(1 for point in p.points or [] if point.get("state") != "dense"),
            created_at=p.created_at,
            finished_at=p.finished_at,
        )
        for p in rows
    ]
    return PlanList(items=items, total=total, limit=limit, offset=offset)


@router.get("/{plan_id}", response_model=PlanOut, responses=NOT_FOUND)
def get_plan(plan_id: PlanId, session: SessionDep) -> Any:
    """The plan: its points (each a job, with its quality and bytes), the dense reference, the Pareto
    front and the recommended point."""
    return plans.plan_json(session, plans.get_or_404(session, plan_id))


@router.post(
    "/{plan_id}/cancel",
    response_model=PlanOut,
    responses={
        **NOT_FOUND,
        403: {"description": "only the plan's owner or an admin may cancel it"},
        409: {"description": "the plan has finished"},
    },
)
def cancel_plan(plan_id: PlanId, session: SessionDep, settings: SettingsDep, r: RedisDep, user: UserDep) -> Any:
    """Its pending points are dropped, its queued jobs cancelled, its running ones asked to stop."""
    plan = plans.cancel(session, settings, r, user, plan_id)
    return plans.plan_json(session, plan)


@router.get(
    "/{plan_id}/table.csv",
    response_class=Response,
    responses={**NOT_FOUND, 200: {"content": {"text/csv": {}}, "description": "one row per point, a header row"}},
)
def plan_table_csv(plan_id: PlanId, session: SessionDep) -> Response:
    """The plan's table as CSV (text cells that a spreadsheet would read as a formula start with ')."""
    data = plans.plan_json(session, plans.get_or_404(session, plan_id))
    return Response(
        table_csv(data),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="sparsegpt-plan-{plan_id}.csv"'},
    )

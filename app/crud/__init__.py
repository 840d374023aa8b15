"""The data-access layer: every query and state transition, and nothing else touches the ORM's
queries. Transitions are compare-and-set UPDATEs on the job row, so two processes can never
both move a job (a redelivered message, a late cancel).

- ``app.crud.jobs``: jobs as the API and the dashboard see them (create, read, list, cancel, delete)
- ``app.crud.lifecycle``: the worker's and the sweeper's side (claim, heartbeat, finish, lost jobs)
- ``app.crud.accounts``: users and uploaded calibration sets
- ``app.crud.plans``: compression plans (their rows, lock, points) and the jobs' plan columns

Callers write ``from app import crud`` and ``crud.<function>``.
"""

from __future__ import annotations

from app.crud.accounts import (  # noqa: F401
    calibration_path_in_use,
    calibration_sets_created_before,
    create_calibration_set,
    create_user,
    delete_calibration_set,
    get_calibration_set,
    get_or_create_local_user,
    get_user,
    get_user_by_name,
    get_user_by_token_hash,
    list_calibration_sets,
    list_users,
    set_calibration_path,
    upload_usage,
    uploads_in_use,
)
from app.crud.jobs import (  # noqa: F401
    CancelOutcome,
    artifact_totals,
    count_active_jobs,
    create_job,
    delete_job,
    discard_unsent,
    get_artifact,
    get_job,
    get_job_by_idempotency_key,
    jobs_page,
    list_job_summaries,
    lock_user,
    refresh_job,
    request_cancel,
    set_task_id,
    status_counts,
    usage_by_user,
)
from app.crud.lifecycle import (  # noqa: F401
    Claim,
    artifacts_to_expire,
    claim_job,
    finish_job,
    heartbeat,
    job_routes,
    mark_artifact_expired,
    queued_jobs_sent_before,
    release_stale,
    replace_task_id,
    running_jobs_with_stale_heartbeat,
    stale_before,
)
from app.crud.plans import (  # noqa: F401
    create_plan,
    get_plan,
    get_plan_by_idempotency_key,
    list_plans,
    lock_plan,
    mark_plan_job,
    plan_jobs,
    plans_to_advance,
    save_plan,
)
from app.crud.sessions import (  # noqa: F401
    create_web_session,
    get_web_session,
    purge_web_sessions,
    revoke_user_sessions,
    revoke_web_session,
)

"""The data-access layer: every query and state transition, and nothing else touches the ORM's
queries. Transitions are compare-and-set UPDATEs on the job row, so two processes can never
both move a job (a redelivered message, a late cancel).

- ``app.crud.jobs``: jobs as the API and the dashboard see them (create, read, list, cancel, delete)
- ``app.crud.lifecycle``: the worker's and the sweeper's side (claim, heartbeat, finish, lost jobs)
- ``app.crud.accounts``: users and uploaded calibration sets

Callers write ``from app import crud`` and ``crud.<function>``.
"""

from __future__ import annotations

from app.crud.jobs import (  # noqa: F401
    create_job,
    set_task_id,
    get_job_by_idempotency_key,
    lock_user,
    count_active_jobs,
    delete_job,
    get_job,
    get_artifact,
    list_jobs,
    discard_unsent,
    CancelOutcome,
    request_cancel,
    refresh_job,
    usage_by_user,
    jobs_page,
    status_counts,
    artifact_totals,
)
from app.crud.lifecycle import (  # noqa: F401
    Claim,
    claim_job,
    heartbeat,
    finish_job,
    running_jobs_with_stale_heartbeat,
    release_stale,
    queued_jobs_sent_before,
    replace_task_id,
    job_queues,
    artifacts_to_expire,
    mark_artifact_expired,
    stale_before,
)
from app.crud.accounts import (  # noqa: F401
    create_calibration_set,
    set_calibration_path,
    get_calibration_set,
    list_calibration_sets,
    upload_usage,
    calibration_sets_created_before,
    uploads_in_use,
    delete_calibration_set,
    calibration_path_in_use,
    create_user,
    get_user_by_token_hash,
    get_user,
    get_or_create_local_user,
    get_user_by_name,
    list_users,
)
from app.crud.sessions import (  # noqa: F401
    create_web_session,
    get_web_session,
    revoke_web_session,
    revoke_user_sessions,
    purge_web_sessions,
)

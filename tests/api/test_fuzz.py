"""Schemathesis against the running server's own OpenAPI schema, signed in: no 5xx, and every
response matches the schema (status codes, content types, bodies). Bounded: a few examples
per operation (SPARSEGPT_FUZZ_EXAMPLES, default 12)."""

from __future__ import annotations

import os

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = pytest.mark.slow
EXAMPLES = int(os.environ.get("SPARSEGPT_FUZZ_EXAMPLES", "12"))


@pytest.fixture(scope="module")
def live(team_pg, redis_binary, models_dir, tmp_path_factory):
    """The API as a process (no worker: jobs stay queued), with a user's token."""
    import secrets

    from tests.support.processes import RedisServer, add_user, base_env
    from tests.support.stacks import Stack

    redis_server = RedisServer(tmp_path_factory.mktemp("fuzz-redis"))
    redis_server.start()
    data = tmp_path_factory.mktemp("fuzz-data")
    logs = tmp_path_factory.mktemp("fuzz-logs")
    env = base_env(
        SPARSEGPT_DATA_DIR=str(data),
        DATABASE_URL=team_pg,
        REDIS_URL=redis_server.url,
        SPARSEGPT_LOCAL_DIRS=str(models_dir),
        SPARSEGPT_QUEUE=f"fuzz-{secrets.token_hex(3)}",
        SPARSEGPT_AUTH="required",
        SPARSEGPT_MAX_ACTIVE_JOBS_PER_USER="1000",
        SPARSEGPT_MAX_UPLOAD_BYTES="65536",
    )
    stack = Stack(env, logs)
    stack.token = add_user(env, f"fuzzer{secrets.token_hex(2)}")
    stack.start_api()
    yield stack
    stack.stop()
    redis_server.kill()


# Operations by label; the event stream is left out: it stays open while a job is queued and no
# worker runs here (tests/service and tests/team/test_crash.py read it).
OPERATIONS = [
    "POST /api/v1/jobs",
    "GET /api/v1/jobs",
    "GET /api/v1/jobs/{job_id}",
    "POST /api/v1/jobs/{job_id}/retry",
    "DELETE /api/v1/jobs/{job_id}",
    "POST /api/v1/jobs/{job_id}/cancel",
    "GET /api/v1/jobs/{job_id}/artifact",
    "GET /api/v1/jobs/{job_id}/artifacts/{format}",
    "POST /api/v1/calibration-sets",
    "GET /api/v1/calibration-sets",
    "GET /api/v1/health",
    "GET /api/v1/me",
    "GET /api/v1/workers",
    "GET /api/v1/usage",
    "DELETE /api/v1/calibration-sets/{set_id}",
    "POST /api/v1/plans",
    "GET /api/v1/plans",
    "GET /api/v1/plans/{plan_id}",
    "POST /api/v1/plans/{plan_id}/cancel",
    "GET /api/v1/plans/{plan_id}/table.csv",
]


@pytest.fixture(scope="module")
def live_schema(live):
    return schemathesis.openapi.from_url(f"{live.base}/openapi.json")


def test_every_operation_is_fuzzed(live_schema):
    labels = {op.ok().label for op in live_schema.get_all_operations()}
    assert labels - {"GET /api/v1/jobs/{job_id}/events"} == set(OPERATIONS)


@pytest.mark.parametrize("label", OPERATIONS)
def test_api_conforms_to_its_schema(live, live_schema, label):
    """Hypothesis drives schemathesis's strategy for one operation (its pytest plugin is not
    used: it does not support this pytest)."""
    operation = live_schema.find_operation_by_label(label)
    checks = [not_a_server_error, response_schema_conformance, status_code_conformance, content_type_conformance]

    @given(case=operation.as_strategy())
    @settings(
        max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None
    )
    def fuzz(case):
        case.call_and_validate(
            base_url=live.base, headers={"Authorization": f"Bearer {live.token}"}, checks=checks, timeout=20
        )

    fuzz()

"""plans (compression plans: a group of ordinary jobs over a grid of settings or a budget search),
jobs.plan_id and jobs.priority (the Celery message priority every (re)send of the job's message uses)

A plan's points (its candidate settings, each with its state and job) are one JSON column: the plan
row is locked while its advancer changes them (app/services/plans.py), so no finer rows are needed.
``plans.idempotency_key`` / ``body_sha256``: POST /plans honours an Idempotency-Key as POST /jobs does.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "plans",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("owner_id", sa.Integer(), sa.ForeignKey("users.id", ondelete="SET NULL"), nullable=True),
        sa.Column("name", sa.String(128), nullable=True),
        sa.Column("model", sa.String(512), nullable=False),
        sa.Column("base", sa.JSON(), nullable=False),
        sa.Column("mode", sa.String(8), nullable=False),
        sa.Column("budget", sa.JSON(), nullable=True),
        sa.Column("points", sa.JSON(), nullable=False),
        sa.Column("priority", sa.String(8), nullable=False, server_default="normal"),
        sa.Column("status", sa.String(16), nullable=False, server_default="queued"),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("idempotency_key", sa.String(255), nullable=True),
        sa.Column("body_sha256", sa.String(64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_plans_owner_id", "plans", ["owner_id"])
    op.create_index("ix_plans_status", "plans", ["status"])
    op.create_index("ux_plans_owner_idempotency_key", "plans", ["owner_id", "idempotency_key"], unique=True)
    # On SQLite the foreign key rebuilds the table: AUTOINCREMENT kept (migration 0003's reason).
    with op.batch_alter_table("jobs", table_kwargs={"sqlite_autoincrement": True}) as batch:
        batch.add_column(sa.Column("plan_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("priority", sa.Integer(), nullable=True))
        batch.create_foreign_key("fk_jobs_plan_id_plans", "plans", ["plan_id"], ["id"], ondelete="SET NULL")
        batch.create_index("ix_jobs_plan_id", ["plan_id"])


def downgrade() -> None:
    with op.batch_alter_table("jobs", table_kwargs={"sqlite_autoincrement": True}) as batch:
        batch.drop_index("ix_jobs_plan_id")
        batch.drop_constraint("fk_jobs_plan_id_plans", type_="foreignkey")
        batch.drop_column("priority")
        batch.drop_column("plan_id")
    op.drop_index("ux_plans_owner_idempotency_key", table_name="plans")
    op.drop_index("ix_plans_status", table_name="plans")
    op.drop_index("ix_plans_owner_id", table_name="plans")
    op.drop_table("plans")

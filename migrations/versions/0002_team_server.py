"""team server: idempotency keys, message bookkeeping, artifact expiry, retries

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 14:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("idempotency_key", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("spec_sha256", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("artifact_expired_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("retry_of", sa.Integer(), nullable=True))
        batch_op.create_index("ux_jobs_owner_idempotency_key", ["owner_id", "idempotency_key"], unique=True)
        batch_op.create_index("ix_jobs_status_heartbeat", ["status", "heartbeat_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_status_heartbeat")
        batch_op.drop_index("ux_jobs_owner_idempotency_key")
        batch_op.drop_column("retry_of")
        batch_op.drop_column("artifact_expired_at")
        batch_op.drop_column("enqueued_at")
        batch_op.drop_column("spec_sha256")
        batch_op.drop_column("idempotency_key")

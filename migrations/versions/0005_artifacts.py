"""artifacts as rows: one per job and format (app/packagers.py); existing jobs' archives get theirs

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "artifacts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("format", sa.String(length=32), nullable=False),
        sa.Column("media_type", sa.String(length=128), nullable=False),
        sa.Column("path", sa.String(length=1024), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expired_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("job_id", "format"),
    )
    op.create_index("ix_artifacts_job_id", "artifacts", ["job_id"], unique=False)
    # The archive every job made before: the Hugging Face directory as one tar, the default format.
    op.execute(
        "INSERT INTO artifacts (job_id, format, media_type, path, size, sha256, created_at, expired_at) "
        "SELECT id, 'hf-tar', 'application/x-tar', artifact_path, artifact_size, artifact_sha256, "
        "COALESCE(finished_at, created_at), artifact_expired_at FROM jobs "
        "WHERE artifact_path IS NOT NULL AND artifact_size IS NOT NULL AND artifact_sha256 IS NOT NULL"
    )


def downgrade() -> None:
    op.drop_index("ix_artifacts_job_id", table_name="artifacts")
    op.drop_table("artifacts")

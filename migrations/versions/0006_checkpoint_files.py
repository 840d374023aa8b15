"""jobs.checkpoint_files: the sha256 of each per-block checkpoint file mirrored to the shared store

A checkpoint fetched from the store is taken up only when every file matches what the database
(trusted, unlike the store) recorded as the blocks finished (issue 22, item 2; app/mirror.py).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-08 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("checkpoint_files", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("checkpoint_files")

"""Review before release: each job records its release mode (`auto` or `review`), when it started
waiting for a reviewer, and the reviewer's decision (verdict, name, comment, changed finding, time).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02

Jobs created before this revision were released automatically, so they get `auto`.
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("release", sa.String(length=16), nullable=False, server_default="auto"))
        batch.add_column(sa.Column("awaiting_since", sa.DateTime(), nullable=True))
        batch.add_column(sa.Column("review", sa.String(length=16), nullable=True))
        batch.add_column(sa.Column("reviewer", sa.String(length=128), nullable=True))
        batch.add_column(sa.Column("reviewer_organization", sa.String(length=128), nullable=True))
        batch.add_column(sa.Column("review_comment", sa.Text(), nullable=True))
        batch.add_column(sa.Column("reviewed_finding", sa.String(length=128), nullable=True))
        batch.add_column(sa.Column("reviewed_at", sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        for column in ("reviewed_at", "reviewed_finding", "review_comment", "reviewer_organization", "reviewer", "review",
                       "awaiting_since", "release"):
            batch.drop_column(column)

"""Routing: each job records the route that matched, its model card and the series it reads; a study no
route matches gets a job in the terminal state `ignored` (the reason in `error`).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01

Jobs created before routing keep empty values: the worker then loads the configured default model and
reads every stored series, which is what the first release did.
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("route", sa.String(length=64), nullable=False, server_default=""))
        batch.add_column(sa.Column("card_path", sa.Text(), nullable=False, server_default=""))
        batch.add_column(sa.Column("model", sa.String(length=128), nullable=False, server_default=""))
        batch.add_column(sa.Column("series_uids", sa.Text(), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        for column in ("series_uids", "model", "card_path", "route"):
            batch.drop_column(column)

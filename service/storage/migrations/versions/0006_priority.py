"""Job priority (README "Routing", "Priority"): each job records the priority its route (or the calling AE
override) gave it, `urgent`, `normal` or `background`; its stage messages go to that priority's queues.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03

Jobs created before this revision ran at one priority, so they get `normal`.
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
        batch.add_column(sa.Column("priority", sa.String(length=16), nullable=False, server_default="normal"))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("priority")

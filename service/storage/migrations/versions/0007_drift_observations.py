"""Drift monitoring (README "Drift"): the drift items each job's infer stage records per model, which the
API compares with the model card's reference (PSI per item, `dfusion_model_drift_psi`).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04

A new table only: existing rows are not touched; jobs inferred before it have no observation.
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
        "drift_observations",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("job_id", sa.Integer(), sa.ForeignKey("jobs.id"), nullable=False),
        sa.Column("model_name", sa.String(length=128), nullable=False),
        sa.Column("model_version", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("items", sa.Text(), nullable=False),
        sa.UniqueConstraint("job_id", "model_name"),
    )
    op.create_index("ix_drift_observations_model", "drift_observations",
                    ["model_name", "model_version", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_drift_observations_model", "drift_observations")
    op.drop_table("drift_observations")

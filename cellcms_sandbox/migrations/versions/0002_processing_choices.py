"""Processing choices and outputs: restriction marker, sharing flag, objections, analytics and marketing outputs.

What the rights of restriction (GDPR art. 18), objection (art. 21) and the CCPA opt-out act on. Written out
explicitly, like 0001, so that this revision stays what it was when schema.py changes.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = postgresql.TIMESTAMP(timezone=True)


def upgrade() -> None:
    op.add_column("accounts", sa.Column("processing_restricted_at", TS, nullable=True))
    op.add_column(
        "preferences", sa.Column("share_with_partners", sa.Boolean(), server_default="false", nullable=False)
    )
    op.create_table(
        "processing_objections",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("account_id", sa.BigInteger(), nullable=False),
        sa.Column("purpose", sa.Text(), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("objected_at", TS, nullable=False),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("account_id", "purpose"),
    )
    op.create_index("ix_processing_objections_account_id", "processing_objections", ["account_id"], unique=False)
    op.create_table(
        "analytics_profiles",
        sa.Column("account_id", sa.BigInteger(), nullable=False),
        sa.Column("segment", sa.Text(), nullable=False),
        sa.Column("computed_at", TS, nullable=False),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"]),
        sa.PrimaryKeyConstraint("account_id"),
    )
    op.create_table(
        "marketing_audience_members",
        sa.Column("audience", sa.Text(), nullable=False),
        sa.Column("account_id", sa.BigInteger(), nullable=False),
        sa.Column("added_at", TS, nullable=False),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"]),
        sa.PrimaryKeyConstraint("audience", "account_id"),
    )
    op.create_index(
        "ix_marketing_audience_members_account_id", "marketing_audience_members", ["account_id"], unique=False
    )


def downgrade() -> None:
    op.drop_table("marketing_audience_members")
    op.drop_table("analytics_profiles")
    op.drop_table("processing_objections")
    op.drop_column("preferences", "share_with_partners")
    op.drop_column("accounts", "processing_restricted_at")

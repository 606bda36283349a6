"""The sandbox CellCMS schema, as `cellcms_sandbox/schema.py` defines it.

Written out explicitly (not built from the metadata) so that this revision stays what it was when schema.py
changes: a later change to schema.py needs a new revision. `tests/test_sandbox.py` checks with Alembic's
comparator that upgrading to head gives exactly schema.py's tables, columns, keys and indexes.

Revision ID: 0001
Revises:
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _ts(name: str, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, postgresql.TIMESTAMP(timezone=True), nullable=nullable)


def _id() -> sa.Column[int]:
    # A lone BigInteger primary key becomes BIGSERIAL, as in schema.py.
    return sa.Column("id", sa.BigInteger(), nullable=False)


def _account_ref(nullable: bool = False) -> list[sa.schema.SchemaItem]:
    return [
        sa.Column("account_id", sa.BigInteger(), nullable=nullable),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"]),
    ]


def _index(table: str, column: str) -> None:
    op.create_index(f"ix_{table}_{column}", table, [column], unique=False)


def upgrade() -> None:
    # --- account information ---------------------------------------------------------------------------------
    op.create_table(
        "accounts",
        _id(),
        sa.Column("email", sa.Text(), nullable=False),
        sa.Column("full_name", sa.Text(), nullable=False),
        sa.Column("password_hash", sa.Text(), nullable=False),
        sa.Column("phone", sa.Text(), nullable=True),
        sa.Column("birth_date", sa.Date(), nullable=True),
        sa.Column("is_minor_flagged", sa.Boolean(), server_default="false", nullable=False),
        sa.Column("plan", sa.Text(), nullable=False),
        _ts("created_at"),
        _ts("last_active_at", nullable=True),
        _ts("deleted_at", nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("email"),
    )

    # --- billing ---------------------------------------------------------------------------------------------
    op.create_table(
        "billing_profiles",
        sa.Column("account_id", sa.BigInteger(), nullable=False),
        sa.Column("stripe_customer_id", sa.Text(), nullable=False),
        sa.Column("billing_name", sa.Text(), nullable=False),
        sa.Column("billing_email", sa.Text(), nullable=False),
        sa.Column("address_line1", sa.Text(), nullable=False),
        sa.Column("address_city", sa.Text(), nullable=False),
        sa.Column("address_postal_code", sa.Text(), nullable=False),
        sa.Column("address_country", sa.Text(), nullable=False),
        sa.Column("vat_number", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"]),
        sa.PrimaryKeyConstraint("account_id"),
        sa.UniqueConstraint("stripe_customer_id"),
    )
    op.create_table(
        "invoices",
        _id(),
        *_account_ref(nullable=True),
        sa.Column("invoice_number", sa.Text(), nullable=False),
        sa.Column("stripe_invoice_id", sa.Text(), nullable=True),
        sa.Column("issued_at", sa.Date(), nullable=False),
        sa.Column("amount_cents", sa.Integer(), nullable=False),
        sa.Column("tax_cents", sa.Integer(), nullable=False),
        sa.Column("currency", sa.Text(), nullable=False),
        sa.Column("tax_country", sa.Text(), nullable=False),
        sa.Column("billing_name", sa.Text(), nullable=True),
        sa.Column("billing_email", sa.Text(), nullable=True),
        sa.Column("billing_address", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("invoice_number"),
    )
    _index("invoices", "account_id")

    # --- content ---------------------------------------------------------------------------------------------
    op.create_table(
        "projects",
        _id(),
        sa.Column("owner_account_id", sa.BigInteger(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        _ts("created_at"),
        sa.ForeignKeyConstraint(["owner_account_id"], ["accounts.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    _index("projects", "owner_account_id")
    op.create_table(
        "project_members",
        sa.Column("project_id", sa.BigInteger(), nullable=False),
        sa.Column("account_id", sa.BigInteger(), nullable=False),
        sa.Column("role", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["project_id"], ["projects.id"]),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"]),
        sa.PrimaryKeyConstraint("project_id", "account_id"),
    )
    _index("project_members", "account_id")
    op.create_table(
        "documents",
        _id(),
        sa.Column("project_id", sa.BigInteger(), nullable=False),
        sa.Column("author_account_id", sa.BigInteger(), nullable=True),
        sa.Column("title", sa.Text(), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        _ts("created_at"),
        _ts("updated_at"),
        sa.ForeignKeyConstraint(["project_id"], ["projects.id"]),
        sa.ForeignKeyConstraint(["author_account_id"], ["accounts.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    _index("documents", "project_id")
    _index("documents", "author_account_id")
    op.create_table(
        "content_schemas",
        _id(),
        sa.Column("project_id", sa.BigInteger(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("definition", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        _ts("created_at"),
        sa.ForeignKeyConstraint(["project_id"], ["projects.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    _index("content_schemas", "project_id")
    op.create_table(
        "assets",
        _id(),
        sa.Column("project_id", sa.BigInteger(), nullable=False),
        sa.Column("filename", sa.Text(), nullable=False),
        sa.Column("content_type", sa.Text(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("s3_key", sa.Text(), nullable=False),
        _ts("created_at"),
        sa.ForeignKeyConstraint(["project_id"], ["projects.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    _index("assets", "project_id")
    op.create_table(
        "asset_versions",
        _id(),
        sa.Column("asset_id", sa.BigInteger(), nullable=False),
        sa.Column("version_number", sa.Integer(), nullable=False),
        sa.Column("s3_version_id", sa.Text(), nullable=True),
        _ts("uploaded_at"),
        sa.Column("uploader_ip", postgresql.INET(), nullable=True),
        sa.ForeignKeyConstraint(["asset_id"], ["assets.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    _index("asset_versions", "asset_id")

    # --- communications --------------------------------------------------------------------------------------
    op.create_table(
        "support_tickets",
        _id(),
        *_account_ref(),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        _ts("created_at"),
        sa.PrimaryKeyConstraint("id"),
    )
    _index("support_tickets", "account_id")
    op.create_table(
        "support_messages",
        _id(),
        sa.Column("ticket_id", sa.BigInteger(), nullable=False),
        sa.Column("from_staff", sa.Boolean(), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        _ts("sent_at"),
        sa.ForeignKeyConstraint(["ticket_id"], ["support_tickets.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    _index("support_messages", "ticket_id")
    op.create_table(
        "survey_responses",
        _id(),
        *_account_ref(),
        sa.Column("survey_name", sa.Text(), nullable=False),
        sa.Column("answers", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("free_text", sa.Text(), nullable=True),
        _ts("submitted_at"),
        sa.PrimaryKeyConstraint("id"),
    )
    _index("survey_responses", "account_id")

    # --- usage data ------------------------------------------------------------------------------------------
    op.create_table(
        "page_views",
        _id(),
        *_account_ref(),
        sa.Column("path", sa.Text(), nullable=False),
        _ts("viewed_at"),
        sa.Column("session_id", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    _index("page_views", "account_id")
    op.create_table(
        "feature_usage",
        _id(),
        *_account_ref(),
        sa.Column("feature", sa.Text(), nullable=False),
        _ts("used_at"),
        sa.PrimaryKeyConstraint("id"),
    )
    _index("feature_usage", "account_id")
    op.create_table(
        "api_call_counts",
        sa.Column("account_id", sa.BigInteger(), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("calls", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"]),
        sa.PrimaryKeyConstraint("account_id", "day"),
    )

    # --- device information ----------------------------------------------------------------------------------
    op.create_table(
        "devices",
        _id(),
        *_account_ref(),
        sa.Column("device_identifier", sa.Text(), nullable=False),
        sa.Column("browser", sa.Text(), nullable=False),
        sa.Column("os", sa.Text(), nullable=False),
        sa.Column("screen_resolution", sa.Text(), nullable=False),
        _ts("first_seen_at"),
        sa.PrimaryKeyConstraint("id"),
    )
    _index("devices", "account_id")

    # --- log data --------------------------------------------------------------------------------------------
    op.create_table(
        "access_logs",
        _id(),
        *_account_ref(),
        sa.Column("ip_address", postgresql.INET(), nullable=False),
        _ts("accessed_at"),
        sa.Column("method", sa.Text(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("status_code", sa.SmallInteger(), nullable=False),
        sa.Column("referrer", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    _index("access_logs", "account_id")
    op.create_table(
        "error_logs",
        _id(),
        *_account_ref(nullable=True),
        _ts("occurred_at"),
        sa.Column("level", sa.Text(), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("ip_address", postgresql.INET(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    _index("error_logs", "account_id")

    # --- cookies and preferences -----------------------------------------------------------------------------
    op.create_table(
        "cookie_consents",
        _id(),
        *_account_ref(),
        sa.Column("category", sa.Text(), nullable=False),
        sa.Column("granted", sa.Boolean(), nullable=False),
        _ts("recorded_at"),
        sa.Column("ip_address", postgresql.INET(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("account_id", "category"),
    )
    _index("cookie_consents", "account_id")
    op.create_table(
        "preferences",
        sa.Column("account_id", sa.BigInteger(), nullable=False),
        sa.Column("language", sa.Text(), nullable=False),
        sa.Column("theme", sa.Text(), nullable=False),
        sa.Column("timezone", sa.Text(), nullable=False),
        sa.Column("marketing_emails", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"]),
        sa.PrimaryKeyConstraint("account_id"),
    )


# Reversed: children before parents. Dropping a table drops its indexes and constraints with it.
_TABLES_IN_CREATION_ORDER = (
    "accounts",
    "billing_profiles",
    "invoices",
    "projects",
    "project_members",
    "documents",
    "content_schemas",
    "assets",
    "asset_versions",
    "support_tickets",
    "support_messages",
    "survey_responses",
    "page_views",
    "feature_usage",
    "api_call_counts",
    "devices",
    "access_logs",
    "error_logs",
    "cookie_consents",
    "preferences",
)


def downgrade() -> None:
    for table in reversed(_TABLES_IN_CREATION_ORDER):
        op.drop_table(table)

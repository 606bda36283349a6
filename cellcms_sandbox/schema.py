"""The synthetic CellCMS schema: every category of personal data the privacy policy names.

This is the *sandbox* the privacy-ops flows act on in the demo and the tests. Flows and tasks never import it:
they know CellCMS only through `datamap/cellcms.yaml`. Alembic migrations in `cellcms_sandbox/migrations` create
exactly these tables.

Hard cases on purpose: documents authored by a collaborator in another account's project, free text that names
people, IP addresses in logs and referrers, and rows that reach the account only through a foreign-key chain
(support_messages -> support_tickets -> accounts, asset_versions -> assets -> projects -> accounts).
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Date,
    ForeignKey,
    Integer,
    MetaData,
    SmallInteger,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import INET, JSONB, TIMESTAMP

metadata = MetaData()

TS = TIMESTAMP(timezone=True)


def _account_fk(nullable: bool = False) -> Column[int]:
    return Column("account_id", BigInteger, ForeignKey("accounts.id"), nullable=nullable, index=True)


# --- account information -------------------------------------------------------------------------------------
accounts = Table(
    "accounts",
    metadata,
    Column("id", BigInteger, primary_key=True),
    Column("email", Text, nullable=False, unique=True),
    Column("full_name", Text, nullable=False),
    Column("password_hash", Text, nullable=False),
    Column("phone", Text),
    Column("birth_date", Date),
    Column("is_minor_flagged", Boolean, nullable=False, server_default="false"),
    Column("plan", Text, nullable=False),
    Column("created_at", TS, nullable=False),
    Column("last_active_at", TS),
    Column("deleted_at", TS),
    # Set while processing is restricted (GDPR art. 18): the data is kept, every restrictable processing skips it.
    Column("processing_restricted_at", TS),
)

# --- billing ---------------------------------------------------------------------------------------------------
billing_profiles = Table(
    "billing_profiles",
    metadata,
    Column("account_id", BigInteger, ForeignKey("accounts.id"), primary_key=True),
    Column("stripe_customer_id", Text, nullable=False, unique=True),
    Column("billing_name", Text, nullable=False),
    Column("billing_email", Text, nullable=False),
    Column("address_line1", Text, nullable=False),
    Column("address_city", Text, nullable=False),
    Column("address_postal_code", Text, nullable=False),
    Column("address_country", Text, nullable=False),
    Column("vat_number", Text),
)

invoices = Table(
    "invoices",
    metadata,
    Column("id", BigInteger, primary_key=True),
    _account_fk(nullable=True),  # nullable: invoices outlive an erased account (tax law)
    Column("invoice_number", Text, nullable=False, unique=True),
    Column("stripe_invoice_id", Text),
    Column("issued_at", Date, nullable=False),
    Column("amount_cents", Integer, nullable=False),
    Column("tax_cents", Integer, nullable=False),
    Column("currency", Text, nullable=False),
    Column("tax_country", Text, nullable=False),
    Column("billing_name", Text),
    Column("billing_email", Text),
    Column("billing_address", Text),
)

# --- content -----------------------------------------------------------------------------------------------------
projects = Table(
    "projects",
    metadata,
    Column("id", BigInteger, primary_key=True),
    Column("owner_account_id", BigInteger, ForeignKey("accounts.id"), nullable=False, index=True),
    Column("name", Text, nullable=False),
    Column("created_at", TS, nullable=False),
)

project_members = Table(
    "project_members",
    metadata,
    Column("project_id", BigInteger, ForeignKey("projects.id"), primary_key=True),
    Column("account_id", BigInteger, ForeignKey("accounts.id"), primary_key=True, index=True),
    Column("role", Text, nullable=False),
)

documents = Table(
    "documents",
    metadata,
    Column("id", BigInteger, primary_key=True),
    Column("project_id", BigInteger, ForeignKey("projects.id"), nullable=False, index=True),
    # A collaborator from another account may author a document in someone else's project.
    Column("author_account_id", BigInteger, ForeignKey("accounts.id"), index=True),
    Column("title", Text, nullable=False),
    Column("body", Text, nullable=False),
    Column("created_at", TS, nullable=False),
    Column("updated_at", TS, nullable=False),
)

content_schemas = Table(
    "content_schemas",
    metadata,
    Column("id", BigInteger, primary_key=True),
    Column("project_id", BigInteger, ForeignKey("projects.id"), nullable=False, index=True),
    Column("name", Text, nullable=False),
    Column("definition", JSONB, nullable=False),
    Column("created_at", TS, nullable=False),
)

assets = Table(
    "assets",
    metadata,
    Column("id", BigInteger, primary_key=True),
    Column("project_id", BigInteger, ForeignKey("projects.id"), nullable=False, index=True),
    Column("filename", Text, nullable=False),
    Column("content_type", Text, nullable=False),
    Column("size_bytes", BigInteger, nullable=False),
    # Files live in S3 under accounts/<owner account id>/assets/<asset id>/<filename>
    Column("s3_key", Text, nullable=False),
    Column("created_at", TS, nullable=False),
)

# Reaches the account only through assets -> projects -> accounts.
asset_versions = Table(
    "asset_versions",
    metadata,
    Column("id", BigInteger, primary_key=True),
    Column("asset_id", BigInteger, ForeignKey("assets.id"), nullable=False, index=True),
    Column("version_number", Integer, nullable=False),
    Column("s3_version_id", Text),
    Column("uploaded_at", TS, nullable=False),
    Column("uploader_ip", INET),
)

# --- communications ----------------------------------------------------------------------------------------------
support_tickets = Table(
    "support_tickets",
    metadata,
    Column("id", BigInteger, primary_key=True),
    _account_fk(),
    Column("subject", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("created_at", TS, nullable=False),
)

# Reaches the account only through support_tickets.
support_messages = Table(
    "support_messages",
    metadata,
    Column("id", BigInteger, primary_key=True),
    Column("ticket_id", BigInteger, ForeignKey("support_tickets.id"), nullable=False, index=True),
    Column("from_staff", Boolean, nullable=False),
    Column("body", Text, nullable=False),
    Column("sent_at", TS, nullable=False),
)

survey_responses = Table(
    "survey_responses",
    metadata,
    Column("id", BigInteger, primary_key=True),
    _account_fk(),
    Column("survey_name", Text, nullable=False),
    Column("answers", JSONB, nullable=False),
    Column("free_text", Text),
    Column("submitted_at", TS, nullable=False),
)

# --- usage data ------------------------------------------------------------------------------------------------
page_views = Table(
    "page_views",
    metadata,
    Column("id", BigInteger, primary_key=True),
    _account_fk(),
    Column("path", Text, nullable=False),
    Column("viewed_at", TS, nullable=False),
    Column("session_id", Text, nullable=False),
)

feature_usage = Table(
    "feature_usage",
    metadata,
    Column("id", BigInteger, primary_key=True),
    _account_fk(),
    Column("feature", Text, nullable=False),
    Column("used_at", TS, nullable=False),
)

api_call_counts = Table(
    "api_call_counts",
    metadata,
    Column("account_id", BigInteger, ForeignKey("accounts.id"), primary_key=True),
    Column("day", Date, primary_key=True),
    Column("calls", Integer, nullable=False),
)

# --- device information ------------------------------------------------------------------------------------------
devices = Table(
    "devices",
    metadata,
    Column("id", BigInteger, primary_key=True),
    _account_fk(),
    Column("device_identifier", Text, nullable=False),
    Column("browser", Text, nullable=False),
    Column("os", Text, nullable=False),
    Column("screen_resolution", Text, nullable=False),
    Column("first_seen_at", TS, nullable=False),
)

# --- log data ----------------------------------------------------------------------------------------------------
access_logs = Table(
    "access_logs",
    metadata,
    Column("id", BigInteger, primary_key=True),
    _account_fk(),
    Column("ip_address", INET, nullable=False),
    Column("accessed_at", TS, nullable=False),
    Column("method", Text, nullable=False),
    Column("path", Text, nullable=False),
    Column("status_code", SmallInteger, nullable=False),
    Column("referrer", Text),  # may carry an IP address or the person's email in a query string
)

error_logs = Table(
    "error_logs",
    metadata,
    Column("id", BigInteger, primary_key=True),
    _account_fk(nullable=True),
    Column("occurred_at", TS, nullable=False),
    Column("level", Text, nullable=False),
    Column("message", Text, nullable=False),  # free text: may contain an email or an IP address
    Column("ip_address", INET),
)

# --- cookies and preferences -------------------------------------------------------------------------------------
cookie_consents = Table(
    "cookie_consents",
    metadata,
    Column("id", BigInteger, primary_key=True),
    _account_fk(),
    Column("category", Text, nullable=False),  # essential | analytics | preference
    Column("granted", Boolean, nullable=False),
    Column("recorded_at", TS, nullable=False),
    Column("ip_address", INET),
    UniqueConstraint("account_id", "category"),
)

preferences = Table(
    "preferences",
    metadata,
    Column("account_id", BigInteger, ForeignKey("accounts.id"), primary_key=True),
    Column("language", Text, nullable=False),
    Column("theme", Text, nullable=False),
    Column("timezone", Text, nullable=False),
    Column("marketing_emails", Boolean, nullable=False),
    Column("share_with_partners", Boolean, nullable=False, server_default="false"),  # a sharing flag (CCPA)
)

# --- processing choices and outputs ------------------------------------------------------------------------------
processing_objections = Table(
    "processing_objections",
    metadata,
    Column("id", BigInteger, primary_key=True),
    _account_fk(),
    Column("purpose", Text, nullable=False),  # analytics | marketing | product_research | sale_or_sharing
    Column("source", Text, nullable=False),  # request | global_privacy_control
    Column("objected_at", TS, nullable=False),
    UniqueConstraint("account_id", "purpose"),
)

# What the analytics job computes per account (a processing output: restricted accounts must not appear).
analytics_profiles = Table(
    "analytics_profiles",
    metadata,
    Column("account_id", BigInteger, ForeignKey("accounts.id"), primary_key=True),
    Column("segment", Text, nullable=False),
    Column("computed_at", TS, nullable=False),
)

# Marketing email audiences (a processing output).
marketing_audience_members = Table(
    "marketing_audience_members",
    metadata,
    Column("audience", Text, primary_key=True),
    Column("account_id", BigInteger, ForeignKey("accounts.id"), primary_key=True, index=True),
    Column("added_at", TS, nullable=False),
)

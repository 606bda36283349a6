"""The request lifecycle's own tables, in schema `privacy_ops` of the CellCMS database.

Shared by every right: a request record, its identity verification, the emails sent for it (each kind once), the
hash-chained audit log, and the records retained under a legal basis after erasure (with their purge date).
No column here holds personal data in clear: subjects are keyed hashes, codes are hashes.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    Date,
    Integer,
    LargeBinary,
    MetaData,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, TIMESTAMP
from sqlalchemy.engine import Connection

SCHEMA = "privacy_ops"
metadata = MetaData(schema=SCHEMA)
TS = TIMESTAMP(timezone=True)

requests = Table(
    "requests",
    metadata,
    Column("id", Text, primary_key=True),  # e.g. "req_7f3a9c21b0": short, random, safe to show anywhere
    Column("flow_run_id", Text, unique=True),  # intake is idempotent per flow run
    Column("right", Text, nullable=False),  # access | erasure | ...
    Column("regulation", Text, nullable=False),  # GDPR | CCPA
    Column(
        "status", Text, nullable=False
    ),  # received | awaiting_verification | verified | completed | denied | failed
    Column("subject_hash", Text, nullable=False),
    Column("account_ids", JSONB, nullable=False, server_default="[]"),  # found by locate; [] = no data held
    Column("received_at", TS, nullable=False),
    Column("due_at", TS, nullable=False),
    Column("completed_at", TS),
    Column("requested_by", Text, nullable=False),  # the operator or channel that started it
    Column("outcome", JSONB, nullable=False, server_default="{}"),  # counts per store, export key, check verdicts
)

verifications = Table(
    "verifications",
    metadata,
    Column("request_id", Text, primary_key=True),
    Column("method", Text, nullable=False),  # email_code | operator
    Column("code_hash", Text),
    Column("expires_at", TS),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("status", Text, nullable=False),  # pending | verified | denied | expired
    Column("verified_by", Text),  # operator name, for method=operator
    Column("reason", Text),  # the operator's mandatory reason
    Column("updated_at", TS, nullable=False),
)

notifications = Table(
    "notifications",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("request_id", Text, nullable=False),
    # acknowledgement | verification_code | completion | denial | no_data_held
    Column("kind", Text, nullable=False),
    # sending = claimed (a row left 'sending' by a crashed run is retried) | sent = accepted by the SMTP server
    Column("status", Text, nullable=False),
    Column("message_id", Text, nullable=False),  # deterministic: a resend after a crash carries the same id
    Column("claimed_at", TS, nullable=False, server_default=text("now()")),  # a long-'sending' row needs a look
    Column("sent_at", TS),
    UniqueConstraint("request_id", "kind"),
)

audit_log = Table(
    "audit_log",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),  # contiguous: a gap is a deleted entry
    Column("recorded_at", TS, nullable=False),
    Column("request_id", Text, index=True),  # entries_for_request
    Column("step", Text, nullable=False),
    Column("outcome", Text, nullable=False),
    Column("subject_hash", Text),
    Column("details", JSONB, nullable=False),
    Column("idempotency_key", Text, unique=True),  # a rerun records a finished step once
    Column("prev_hash", Text, nullable=False),
    Column("entry_hash", Text, nullable=False),
)

# The latest entry's hash and seq, updated with every append: deleting the newest entries is detected too.
audit_head = Table(
    "audit_head",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("seq", BigInteger, nullable=False),
    Column("entry_hash", Text, nullable=False),
)

retained_records = Table(
    "retained_records",
    metadata,
    Column("request_id", Text, nullable=False),
    Column("pseudonym", Text, nullable=False),
    Column("table_name", Text, nullable=False),
    Column("row_key", Text, nullable=False),
    Column("legal_basis", Text, nullable=False),
    Column("purge_after", Date, nullable=False),
    UniqueConstraint("table_name", "row_key"),
)


# The subject's identifiers, taken before erasure and encrypted (Fernet): what a resumed erasure still needs after
# the database rows are gone (Stripe ids, the address for the completion email). Deleted when the request ends.
subject_snapshots = Table(
    "subject_snapshots",
    metadata,
    Column("request_id", Text, primary_key=True),
    Column("payload", LargeBinary, nullable=False),
    Column("created_at", TS, nullable=False),
)

# Legal holds (litigation, tax audit): a held account, or one held row (table + primary key as retained_records
# writes it, "a,b" for composite keys), is skipped by every retention rule until the hold is lifted. Never deleted:
# a lifted hold keeps lifted_at, so the history stays.
legal_holds = Table(
    "legal_holds",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("account_id", BigInteger, index=True),
    Column("table_name", Text),
    Column("row_key", Text),
    Column("reason", Text, nullable=False),
    Column("placed_by", Text, nullable=False),
    Column("placed_at", TS, nullable=False),
    Column("lifted_by", Text),
    Column("lifted_at", TS),
    CheckConstraint(
        "(account_id IS NOT NULL AND table_name IS NULL AND row_key IS NULL)"
        " OR (account_id IS NULL AND table_name IS NOT NULL AND row_key IS NOT NULL)",
        name="legal_holds_account_or_row",
    ),
)


def ensure_schema(connection: Connection) -> None:
    """Create the lifecycle schema and tables if missing (idempotent, safe under concurrent starts)."""
    connection.execute(text("SELECT pg_advisory_xact_lock(hashtext('privacy_ops.ensure_schema'))"))
    connection.execute(text(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}"))
    metadata.create_all(connection, checkfirst=True)


# ---------------------------------------------------------------------------------------------------------------
# Notices to many people (privacy_ops/notices.py): breach notifications (policy section 3) and policy-change
# notices (section 9). One row per notice; its content (the texts every recipient reads, the selection) is kept so
# that a rerun can be told apart from a different notice under the same id. No personal data: the texts are checked
# for email and IP addresses before they are stored, recipients are account ids.
# ---------------------------------------------------------------------------------------------------------------

from sqlalchemy import Index  # noqa: E402  (only the notice tables use it)

notices = Table(
    "notices",
    metadata,
    Column("id", Text, primary_key=True),  # "breach.<breach id>" | "policy.<version>"
    Column("kind", Text, nullable=False),  # breach | policy
    Column("policy_version", Text, unique=True),  # policy notices: the version announced (once per version)
    # open = recorded, recipients not chosen yet | rejected = nothing sent (see outcome) | selected = recipients
    # recorded | completed = nobody left to send to
    Column("status", Text, nullable=False),
    Column("content", JSONB, nullable=False),  # the parameters that define the notice (not batch size or rate)
    Column("content_hash", Text, nullable=False),
    Column("requested_by", Text, nullable=False),
    Column("report", JSONB, nullable=False, server_default="{}"),  # breach: the supervisory authority's summary
    Column("outcome", JSONB, nullable=False, server_default="{}"),  # delivery counts, or why it was rejected
    Column("created_at", TS, nullable=False),
    Column("selected_at", TS),
    Column("completed_at", TS),
)

# One row per notice and recipient, inserted when the recipients are chosen: the exactly-once record.
# pending -> claimed (in a batch, not handed to SMTP yet; a dead run's claims go back to pending) -> sending (being
# handed to SMTP right now) -> sent | failed (refused by the server) | no_address | not_active (deleted since);
# a row found 'sending' after its run died becomes 'unconfirmed' and is never sent again (at most once).
notice_deliveries = Table(
    "notice_deliveries",
    metadata,
    Column("notice_id", Text, primary_key=True),
    Column("account_id", BigInteger, primary_key=True),
    Column("status", Text, nullable=False, server_default="pending"),
    Column("batch", Integer),
    Column("claimed_at", TS),
    Column("sent_at", TS),
    Column("smtp_code", Integer),  # a refusal's SMTP reply code
    Index("notice_deliveries_by_status", "notice_id", "status", "account_id"),
)

"""Notices to many people: breach notification (privacy policy section 3) and policy-change notices (section 9).

Free of Prefect: `tasks/notices.py` wraps it, `flows/breach_notice.py` and `flows/policy_notice.py` sequence it.

A notice is recorded once in `privacy_ops.notices` (id `breach.<incident id>` or `policy.<version>`) with the
content every recipient reads; a rerun under the same id must bring the same content, else it is rejected before
anything happens. Its recipients are chosen once, set-based, in one transaction (`privacy_ops.notice_deliveries`,
one row per account, unique per notice): for a breach the accounts given by id, or every account the data map
reaches from rows of the given categories or tables; for a policy version every active account. A selection that
finds nobody is rejected: recorded (notice status, audit log), no delivery row, no email.

Exactly once across crashes. Sending runs batch by batch, each under a per-notice advisory lock (one sender at a
time, released by PostgreSQL when a sender dies):
1. recover: rows a dead run left 'claimed' (never handed to SMTP) go back to 'pending'; a row left 'sending' (being
   handed to SMTP when the run died: maybe delivered, maybe not) becomes 'unconfirmed' and is never sent again;
2. claim the next `batch_size` pending rows in one transaction, settling there those without an address on file
   ('no_address') or, for a policy notice, deleted since ('not_active');
3. over one SMTP connection, per recipient, paced to `rate_per_second`: mark it 'sending' (in the transaction that
   marks the previous one 'sent'), send; the last one is marked 'sent' with the batch's audit entry.
A SIGKILL at any moment therefore leaves at most one recipient in doubt. It is reported as 'unconfirmed' and not
resent: at most once, so nobody gets a breach notice twice; everyone else is sent to by the rerun. A recipient the
server refuses is 'failed' (SMTP code kept); a server-wide error puts the rest of the batch back to 'pending' and
raises, so the task's retry or a rerun resumes.

Nothing here puts an address or a name into a log line, exception message, audit entry or report: recipients are
account ids; addresses are read per batch, wrapped in `Pii` and revealed only at the SMTP call.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Select,
    and_,
    any_,
    bindparam,
    func,
    literal,
    or_,
    select,
    text,
    union,
    union_all,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, insert
from sqlalchemy.engine import Connection, Engine

from privacy_ops.datamap.model import Category, DataMap
from privacy_ops.datamap.sql import reach_path, table_clause
from privacy_ops.lifecycle import audit, notify
from privacy_ops.lifecycle.schema import SCHEMA, notice_deliveries, notices
from privacy_ops.pii import Pii

BREACH, POLICY = "breach", "policy"
AUTHORITY_HOURS = 72  # GDPR art. 33(1): the supervisory authority is told within 72 hours of becoming aware
DEFAULT_BATCH_SIZE = 200
DEFAULT_RATE = 20.0  # emails per second: below common provider limits (e.g. Amazon SES starts at 14/s)
LOCK_WAIT_SECONDS = 30.0  # how long a batch waits for another sender of the same notice before giving up
AUTHORITY_SUMMARY_KIND = "breach_authority_summary"
CLOCK_SKEW = timedelta(minutes=5)  # detected_at may be this far "in the future" (operator's clock)

BREACH_ID_PATTERN = r"^[a-z0-9][a-z0-9-]{2,62}$"
POLICY_VERSION_PATTERN = r"^\d{4}-\d{2}-\d{2}(\.\d{1,3})?$"
TABLE_PATTERN = r"^[a-z_][a-z0-9_]{0,62}$"
MAX_ACCOUNT_IDS = 100_000  # larger breaches are selected by category or table

# Statuses of a delivery row (see privacy_ops/lifecycle/schema.py notice_deliveries).
PENDING, CLAIMED, SENDING, SENT = "pending", "claimed", "sending", "sent"
FAILED, NO_ADDRESS, NOT_ACTIVE, UNCONFIRMED = "failed", "no_address", "not_active", "unconfirmed"
DELIVERY_STATUSES = (PENDING, CLAIMED, SENDING, SENT, FAILED, NO_ADDRESS, NOT_ACTIVE, UNCONFIRMED)
OPEN_STATUSES = (PENDING, CLAIMED, SENDING)


class NoticeError(ValueError):
    """A notice cannot go out as asked (no affected accounts, an unknown table, content that differs from the
    notice's first run): recorded, nothing sent. The message names ids, fields and counts, never a person."""


class NoticeBusy(RuntimeError):
    """Another run is sending the same notice right now."""


# ---------------------------------------------------------------------------------------------------------------
# Parameters: typed forms (the Prefect UI renders them; the server and the CLI reject bad input before a run)
# ---------------------------------------------------------------------------------------------------------------


def _no_personal_data(value: str | None, field: str) -> str | None:
    """Texts go to every recipient, the audit log and Prefect: refuse anything that looks like an email or IP."""
    if value is not None:
        try:
            audit.check_no_personal_data(value, field)
        except ValueError:
            raise ValueError(f"{field} looks like it holds an email or IP address (no personal data)") from None
    return value


class Sending(BaseModel):
    """How fast to send; not part of a notice's content, so a rerun may change it."""

    # Errors name the field and the rule, never the value typed (it could be personal data, and Prefect keeps the
    # error of a run whose parameters fail validation).
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    batch_size: int = Field(
        default=DEFAULT_BATCH_SIZE,
        ge=1,
        le=1000,
        description="Recipients per batch: one claim transaction and one SMTP connection each",
    )
    rate_per_second: float = Field(
        default=DEFAULT_RATE, gt=0, le=1000, description="At most this many emails per second (the SMTP limit)"
    )
    requested_by: str = Field(
        default="compliance-ops", min_length=1, max_length=100, description="Who started it (operator or channel)"
    )

    @field_validator("requested_by")
    @classmethod
    def _requested_by_clean(cls, value: str) -> str:
        _no_personal_data(value, "requested_by")
        return value

    @classmethod
    def sending_fields(cls) -> set[str]:
        return set(Sending.model_fields)

    def content(self) -> dict[str, Any]:
        """What defines the notice (JSON-able): everything but the sending options."""
        return self.model_dump(mode="json", exclude=Sending.sending_fields())


class BreachNotice(Sending):
    """A personal data breach: what happened, whom it affects, and what people should know (policy section 3)."""

    breach_id: str = Field(
        pattern=BREACH_ID_PATTERN,
        description="Your incident reference (a-z, 0-9, '-'), e.g. inc-2026-11-30-backup; rerun with it to resume",
    )
    description: str = Field(
        min_length=20,
        max_length=2000,
        description="What happened, in plain language: every affected person reads this (no names, no addresses)",
    )
    detected_at: datetime = Field(description="When we became aware of the breach (UTC if no time zone given)")
    likely_consequences: str = Field(
        min_length=10, max_length=2000, description="The likely consequences for the people affected"
    )
    measures_taken: str = Field(
        min_length=10, max_length=2000, description="What we did or will do to address it and limit its effects"
    )
    advice: str | None = Field(
        default=None, max_length=2000, description="What people can do to protect themselves (optional)"
    )
    account_ids: list[Annotated[int, Field(gt=0)]] = Field(
        default_factory=list,
        max_length=MAX_ACCOUNT_IDS,
        description="The affected accounts, when known by id",
    )
    categories: list[Category] = Field(
        default_factory=list,
        description="Categories of personal data involved; without account ids: every account with such data",
    )
    tables: list[Annotated[str, Field(pattern=TABLE_PATTERN)]] = Field(
        default_factory=list,
        description="Data map tables involved; without account ids: every account with rows in them",
    )

    @field_validator("description", "likely_consequences", "measures_taken", "advice", mode="before")
    @classmethod
    def _stripped(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, str):
            value = value.strip()
            return None if info.field_name == "advice" and not value else value  # blank advice is no advice
        return value

    @field_validator("description", "likely_consequences", "measures_taken", "advice")
    @classmethod
    def _texts_clean(cls, value: str | None, info: ValidationInfo) -> str | None:
        return _no_personal_data(value, str(info.field_name))

    @field_validator("detected_at")
    @classmethod
    def _detected_in_the_past(cls, value: datetime) -> datetime:
        value = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        if value > datetime.now(UTC) + CLOCK_SKEW:
            raise ValueError("detected_at is in the future")
        return value.astimezone(UTC)

    @model_validator(mode="after")
    def _someone_affected(self) -> BreachNotice:
        if not (self.account_ids or self.categories or self.tables):
            raise ValueError("name the affected accounts: account_ids, or categories or tables of the data map")
        self.account_ids = sorted(set(self.account_ids))
        self.categories = sorted(set(self.categories), key=list(Category).index)
        self.tables = sorted(set(self.tables))
        return self

    @property
    def notice_id(self) -> str:
        return f"{BREACH}.{self.breach_id}"

    @property
    def authority_deadline(self) -> datetime:
        return self.detected_at + timedelta(hours=AUTHORITY_HOURS)


class PolicyNotice(Sending):
    """A new version of the privacy policy, announced by email to every active account (policy section 9)."""

    version: str = Field(
        pattern=POLICY_VERSION_PATTERN,
        description="The new version: its 'Last updated' date, YYYY-MM-DD (a same-day revision: YYYY-MM-DD.2)",
    )
    effective_on: date = Field(description="The day the new version takes effect (not before its date)")
    changes: str = Field(
        min_length=20, max_length=4000, description="What changes, in plain language (every account reads this)"
    )
    policy_url: str = Field(
        default="https://cellcms.com/privacy",
        pattern=r"^https://[^\s<>\"]+$",
        max_length=500,
        description="Where the full new policy is published",
    )

    @field_validator("changes", mode="before")
    @classmethod
    def _stripped(cls, value: Any) -> Any:
        return value.strip() if isinstance(value, str) else value

    @field_validator("changes")
    @classmethod
    def _changes_clean(cls, value: str) -> str:
        _no_personal_data(value, "changes")
        return value

    @model_validator(mode="after")
    def _dates(self) -> PolicyNotice:
        try:
            published = date.fromisoformat(self.version[:10])
        except ValueError:
            raise ValueError("version is not a real date (YYYY-MM-DD)") from None
        if self.effective_on < published:
            raise ValueError("effective_on is before the version's date")
        return self

    @property
    def notice_id(self) -> str:
        return f"{POLICY}.{self.version}"


# ---------------------------------------------------------------------------------------------------------------
# The notice record
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Notice:
    id: str
    kind: str
    status: str  # open | rejected | selected | completed
    content: dict[str, Any]
    report: dict[str, Any]
    outcome: dict[str, Any]


def content_hash(content: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(content, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def get_notice(connection: Connection, notice_id: str) -> Notice | None:
    row = connection.execute(select(notices).where(notices.c.id == notice_id)).first()
    if row is None:
        return None
    return Notice(row.id, row.kind, row.status, row.content, row.report, row.outcome)


def _audit(
    connection: Connection, notice_id: str, step: str, outcome: str, details: dict[str, Any], key: str | None
) -> None:
    audit.record(
        connection,
        step=step,
        outcome=outcome,
        request_id=notice_id,
        subject_hash=None,
        details=details,
        idempotency_key=f"{notice_id}:{key}" if key else None,
    )


def open_notice(engine: Engine, params: BreachNotice | PolicyNotice, *, now: datetime) -> Notice:
    """Record the notice, or find it (a rerun). Content that differs from the recorded one replaces it while
    nothing was chosen or sent (a corrected rejected notice), and is refused (NoticeError, recorded) after."""
    kind = BREACH if isinstance(params, BreachNotice) else POLICY
    content = params.content()
    digest = content_hash(content)
    with engine.begin() as connection:
        created = connection.execute(
            insert(notices)
            .values(
                id=params.notice_id,
                kind=kind,
                policy_version=params.version if isinstance(params, PolicyNotice) else None,
                status="open",
                content=content,
                content_hash=digest,
                requested_by=params.requested_by,
                created_at=now,
            )
            .on_conflict_do_nothing()
            .returning(notices.c.id)
        ).first()
        row = connection.execute(select(notices).where(notices.c.id == params.notice_id).with_for_update()).one()
        changed = sorted(k for k in set(content) | set(row.content) if content.get(k) != row.content.get(k))
        if created is not None:
            _audit(
                connection,
                params.notice_id,
                "notice_opened",
                "recorded",
                {"kind": kind, "requested_by": params.requested_by, "content_hash": digest},
                "opened",
            )
        elif row.content_hash != digest and row.status in ("open", "rejected"):
            connection.execute(
                update(notices)
                .where(notices.c.id == params.notice_id)
                .values(status="open", content=content, content_hash=digest, requested_by=params.requested_by)
            )
            _audit(
                connection,
                params.notice_id,
                "notice_revised",
                "recorded",
                {"fields": changed, "requested_by": params.requested_by, "content_hash": digest},
                None,
            )
            row = connection.execute(select(notices).where(notices.c.id == params.notice_id)).one()
    if row.content_hash != digest:
        raise reject(
            engine,
            params.notice_id,
            f"{params.notice_id} went out with different {', '.join(changed)}: a rerun must repeat it exactly "
            f"(a different notice needs a new {'breach_id' if kind == BREACH else 'version'})",
            {"reason": "content_differs", "fields": changed},
            change_status=False,
        )
    return Notice(row.id, row.kind, row.status, row.content, row.report, row.outcome)


def get_notice_or_fail(engine: Engine, notice_id: str) -> Notice:
    with engine.connect() as connection:
        notice = get_notice(connection, notice_id)
    if notice is None:
        raise NoticeError(f"no notice {notice_id}")
    return notice


def reject(
    engine: Engine, notice_id: str, message: str, details: dict[str, Any], *, change_status: bool = True
) -> NoticeError:
    """Record why a notice was refused (audit log; the notice's status unless it went out already); returns the
    error for the caller to raise. Nothing else changes."""
    with engine.begin() as connection:
        if change_status:
            connection.execute(
                update(notices)
                .where(notices.c.id == notice_id, notices.c.status.in_(["open", "rejected"]))
                .values(status="rejected", outcome={"rejected": message, **details})
            )
        _audit(connection, notice_id, "notice_rejected", "rejected", {"message": message, **details}, None)
    return NoticeError(message)


def record_invalid_input(engine: Engine, kind: str, problems: list[str]) -> None:
    """Input refused before any notice existed (the CLI's validation): one audit entry, names and rules only."""
    with engine.begin() as connection:
        audit.record(
            connection,
            step="notice_rejected",
            outcome="invalid_input",
            request_id=None,
            subject_hash=None,
            details={"kind": kind, "problems": problems},
            idempotency_key=None,
        )


# ---------------------------------------------------------------------------------------------------------------
# Who is affected: set-based over the data map
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scope:
    """What a breach involves, in the data map's terms."""

    tables: dict[str, tuple[str, ...] | None]  # table -> columns whose non-null values count (None: every row)
    categories: dict[str, tuple[str, ...]]  # category -> the tables in scope holding it
    whole_map: bool  # no categories or tables given: every mapped table of the accounts given
    elsewhere: tuple[str, ...]  # where the categories are also kept outside PostgreSQL (not counted)


def breach_scope(datamap: DataMap, categories: Sequence[Category | str], tables: Sequence[str]) -> Scope:
    """Tables (or columns) of the map in the breach; NoticeError naming unknown tables or empty categories.

    A table given whole brings every category it holds (its own and its columns'); a category given brings the
    tables of that category whole, and the columns of that category in other tables (rows where one is set).
    Nothing given: the whole map (for a breach known by account ids only).
    """
    mapped = datamap.postgres.tables
    unknown = [t for t in tables if t not in mapped]
    if unknown:
        raise NoticeError(f"not in the data map: table(s) {', '.join(unknown)}")
    scope: dict[str, set[str] | None] = {}
    held: dict[str, set[str]] = {}

    def hold(category: str, table: str) -> None:
        held.setdefault(category, set()).add(table)

    whole_map = not categories and not tables
    for name in mapped if whole_map else tables:
        scope[name] = None
        spec = mapped[name]
        for category in {spec.category.value} | {c.category.value for c in spec.columns.values() if c.category}:
            hold(category, name)
    wanted = [Category(c) for c in categories]
    for category in wanted:
        for name, spec in mapped.items():
            columns = {c for c, column in spec.columns.items() if column.category == category}
            if spec.category == category:
                scope[name] = None
            elif columns:
                current = scope.get(name, set())
                scope[name] = None if current is None else current | columns
            else:
                continue
            hold(category.value, name)
    empty = [c.value for c in wanted if c.value not in held]
    if empty:
        raise NoticeError(f"no table of the data map holds category {', '.join(empty)}")
    involved = set(held)
    elsewhere = [
        f"S3 {name} ({location.bucket_setting}, {location.prefix}): files, not counted"
        for name, location in datamap.s3.items()
        if location.category.value in involved
    ]
    if datamap.stripe is not None and datamap.stripe.category.value in involved:
        elsewhere.append("Stripe customers (payment methods are held by Stripe): not counted")
    return Scope(
        tables={t: None if c is None else tuple(sorted(c)) for t, c in sorted(scope.items())},
        categories={c.value: tuple(sorted(held[c.value])) for c in Category if c.value in held},
        whole_map=whole_map,
        elsewhere=tuple(elsewhere),
    )


_REACHED = "reached_account_id"  # a label no mapped table uses for a column


def _in_scope(datamap: DataMap, table: str, columns: tuple[str, ...] | None) -> list[Select[Any]]:
    """Per reach of `table`: SELECT (primary key..., reached account id) of its rows in scope (columns set)."""
    selects = []
    for index in range(len(datamap.table(table).reaches)):
        path = reach_path(datamap, table, index)
        keys = [path.base.c[k] for k in datamap.table(table).primary_key]
        query = select(*keys, path.account_id.label(_REACHED)).select_from(path.from_)
        query = query.where(path.account_id.is_not(None))
        if columns is not None:
            query = query.where(or_(*(path.base.c[c].is_not(None) for c in columns)))
        selects.append(query)
    return selects


def _recipients(notice_id: str) -> Select[Any]:
    return select(notice_deliveries.c.account_id).where(notice_deliveries.c.notice_id == notice_id)


def _count_records(connection: Connection, datamap: DataMap, notice_id: str, scope: Scope) -> dict[str, int]:
    """Rows per table in scope that reach the notice's recipients (a row reached twice counts once)."""
    counts: dict[str, int] = {}
    recipients = _recipients(notice_id).scalar_subquery()
    key_count = {t: len(datamap.table(t).primary_key) for t in scope.tables}
    for table, columns in scope.tables.items():
        per_reach = []
        for query in _in_scope(datamap, table, columns):
            sub = query.subquery()
            per_reach.append(select(*list(sub.c)[: key_count[table]]).where(sub.c[_REACHED].in_(recipients)))
        rows = per_reach[0] if len(per_reach) == 1 else union(*per_reach)
        counts[table] = connection.execute(select(func.count()).select_from(rows.subquery())).scalar_one()
    return counts


def _select_into_deliveries(connection: Connection, notice_id: str, account_ids: Select[Any]) -> None:
    statement = (
        insert(notice_deliveries)
        .from_select(["notice_id", "account_id"], select(literal(notice_id), account_ids.subquery().c[0]))
        .on_conflict_do_nothing()
    )
    connection.execute(statement)


def _deliveries_count(connection: Connection, notice_id: str) -> int:
    return int(
        connection.execute(select(func.count()).select_from(_recipients(notice_id).subquery())).scalar_one()
    )


class _Nobody(Exception):
    """Raised inside a selection's transaction to roll it back: the selection found nobody."""


def select_breach_recipients(
    engine: Engine, datamap: DataMap, params: BreachNotice, *, now: datetime
) -> dict[str, Any]:
    """Choose the affected accounts once and assess the breach (people, records per table and category), in one
    transaction; returns the supervisory authority's summary, stored with the notice. NoticeError (recorded,
    nothing kept) when the selection is malformed or finds nobody."""
    notice_id = params.notice_id
    notice = get_notice_or_fail(engine, notice_id)
    if notice.status in ("selected", "completed"):
        return notice.report
    try:
        scope = breach_scope(datamap, params.categories, params.tables)
    except NoticeError as error:
        raise reject(engine, notice_id, f"{notice_id}: {error}", {"reason": "bad_selection"}) from None

    subject = datamap.subject
    accounts = table_clause(datamap, subject.table)
    account_id = accounts.c[subject.id_column]
    if params.account_ids:
        given = bindparam("given_ids", value=params.account_ids, type_=ARRAY(BigInteger))
        candidates = select(account_id).where(account_id == any_(given))
    else:
        reached = union_all(
            *(
                query.with_only_columns(query.selected_columns[_REACHED])
                for table, columns in scope.tables.items()
                for query in _in_scope(datamap, table, columns)
            )
        ).subquery()
        candidates = select(account_id).where(account_id.in_(select(reached.c[_REACHED])))
    try:
        with engine.begin() as connection:
            _select_into_deliveries(connection, notice_id, candidates)
            people = _deliveries_count(connection, notice_id)
            if people == 0:
                raise _Nobody(
                    f"none of the {len(params.account_ids)} account id(s) given is a CellCMS account"
                    if params.account_ids
                    else "no account has data in the tables or categories given"
                )
            report = _assess(connection, datamap, params, scope, people, now)
            if not report["categories"]:
                raise _Nobody("the accounts given hold no data in the tables or categories given")
            _mark_selected(connection, notice_id, report, now)
            _audit(
                connection,
                notice_id,
                "breach_assessed",
                "selected",
                {
                    "people": people,
                    "records": report["records"],
                    "tables": report["tables"],
                    "categories": [c["category"] for c in report["categories"]],
                    "detected_at": report["detected_at"],
                    "authority_deadline": report["authority_deadline"],
                },
                "selected",
            )
    except _Nobody as nobody:
        raise reject(
            engine, notice_id, f"{notice_id}: no affected accounts: {nobody}", {"reason": "nobody"}
        ) from None
    return report


def _assess(
    connection: Connection, datamap: DataMap, params: BreachNotice, scope: Scope, people: int, now: datetime
) -> dict[str, Any]:
    """The supervisory authority's summary of a breach whose recipients were just chosen (JSON-able)."""
    subject = datamap.subject
    accounts = table_clause(datamap, subject.table)
    account_id = accounts.c[subject.id_column]
    recipients = _recipients(params.notice_id).scalar_subquery()
    per_table = _count_records(connection, datamap, params.notice_id, scope)
    deleted = datamap.subject.deleted_column
    deleted_count = 0
    if deleted:
        deleted_count = connection.execute(
            select(func.count())
            .select_from(accounts)
            .where(account_id.in_(recipients), accounts.c[deleted].is_not(None))
        ).scalar_one()
    categories: list[dict[str, Any]] = [
        {
            "category": category,
            "label": notify.CATEGORY_LABELS[category],
            "tables": {t: per_table[t] for t in tables},
            "records": sum(per_table[t] for t in tables),
        }
        for category, tables in scope.categories.items()
    ]
    affected = [c for c in categories if c["records"] > 0]
    return {
        "notice": params.notice_id,
        "breach_id": params.breach_id,
        "description": params.description,
        "detected_at": params.detected_at.isoformat(),
        "authority_deadline": params.authority_deadline.isoformat(),
        "people": people,
        "deleted_accounts": int(deleted_count),
        "unknown_account_ids": len(params.account_ids) - people if params.account_ids else 0,
        "records": sum(per_table.values()),
        "tables": per_table,
        "categories": affected,
        "categories_without_records": [c["category"] for c in categories if c not in affected],
        "elsewhere": list(scope.elsewhere),
        "selection": {
            "account_ids": len(params.account_ids),
            "categories": [c.value for c in params.categories],
            "tables": params.tables,
            "whole_map": scope.whole_map,
        },
        "likely_consequences": params.likely_consequences,
        "measures_taken": params.measures_taken,
        "advice": params.advice,
        "assessed_at": now.isoformat(),
        "requested_by": params.requested_by,
    }


def _mark_selected(connection: Connection, notice_id: str, report: dict[str, Any], now: datetime) -> None:
    connection.execute(
        update(notices)
        .where(notices.c.id == notice_id)
        .values(status="selected", selected_at=now, report=report, outcome={})
    )


def select_policy_recipients(
    engine: Engine, datamap: DataMap, params: PolicyNotice, *, now: datetime
) -> dict[str, Any]:
    """Choose every active account (an address on file, not deleted) once per version, in one transaction;
    NoticeError (recorded) when there is none."""
    notice_id = params.notice_id
    notice = get_notice_or_fail(engine, notice_id)
    if notice.status in ("selected", "completed"):
        return notice.report
    subject = datamap.subject
    accounts = table_clause(datamap, subject.table)
    deleted = datamap.subject.deleted_column
    active = [accounts.c[subject.email_column].is_not(None)]
    if deleted:
        active.append(accounts.c[deleted].is_(None))
    try:
        with engine.begin() as connection:
            _select_into_deliveries(
                connection, notice_id, select(accounts.c[subject.id_column]).where(and_(*active))
            )
            people = _deliveries_count(connection, notice_id)
            if people == 0:
                raise _Nobody("no active account to notify")
            report = {
                "notice": notice_id,
                "version": params.version,
                "effective_on": params.effective_on.isoformat(),
                "people": people,
                "selected_at": now.isoformat(),
                "requested_by": params.requested_by,
            }
            _mark_selected(connection, notice_id, report, now)
            _audit(
                connection,
                notice_id,
                "policy_notice_selected",
                "selected",
                {"version": params.version, "people": people},
                "selected",
            )
    except _Nobody as nobody:
        raise reject(engine, notice_id, f"{notice_id}: {nobody}", {"reason": "nobody"}) from None
    return report


# ---------------------------------------------------------------------------------------------------------------
# Sending, batch by batch
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchReport:
    """One batch's counts (no personal data); `batch` None when nothing was left to claim."""

    batch: int | None
    claimed: int = 0
    sent: int = 0
    failed: int = 0
    no_address: int = 0
    not_active: int = 0
    unconfirmed: int = 0  # found 'sending' from a run that died (recovered at the start of this batch)
    remaining: int = 0  # still pending after this batch

    def summary(self) -> dict[str, Any]:
        return asdict(self)


class Pacer:
    """At most `rate` calls of `wait()` per second, evenly spaced."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate
        self._next = time.monotonic()

    def wait(self) -> None:
        delay = self._next - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        self._next = max(self._next, time.monotonic() - self.interval) + self.interval


_LOCK = text("SELECT pg_try_advisory_lock(hashtext('privacy_ops.notice'), hashtext(:notice_id))")
_UNLOCK = text("SELECT pg_advisory_unlock(hashtext('privacy_ops.notice'), hashtext(:notice_id))")


@contextlib.contextmanager
def sender_lock(engine: Engine, notice_id: str, wait_seconds: float = LOCK_WAIT_SECONDS) -> Iterator[None]:
    """Hold the notice's session-level advisory lock (PostgreSQL drops it if this process dies) or raise
    NoticeBusy after `wait_seconds`."""
    connection = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    try:
        deadline = time.monotonic() + wait_seconds
        while not connection.execute(_LOCK, {"notice_id": notice_id}).scalar_one():
            if time.monotonic() >= deadline:
                raise NoticeBusy(f"{notice_id} is being sent by another run; try again when it has finished")
            time.sleep(0.5)
        try:
            yield
        finally:
            try:
                connection.execute(_UNLOCK, {"notice_id": notice_id})
            except Exception:
                connection.invalidate()  # never return a connection that may still hold the lock to the pool
                raise
    finally:
        connection.close()


def _set_status(
    connection: Connection, notice_id: str, account_ids: Sequence[int], status: str, **values: Any
) -> int:
    if not account_ids:
        return 0
    statement = (
        update(notice_deliveries)
        .where(notice_deliveries.c.notice_id == notice_id, notice_deliveries.c.account_id.in_(list(account_ids)))
        .values(status=status, **values)
    )
    return int(connection.execute(statement).rowcount)


def _release_claims(connection: Connection, notice_id: str) -> int:
    """Claimed rows were never handed to SMTP: back to pending (only called under the sender lock)."""
    statement = (
        update(notice_deliveries)
        .where(notice_deliveries.c.notice_id == notice_id, notice_deliveries.c.status == CLAIMED)
        .values(status=PENDING, batch=None, claimed_at=None)
    )
    return int(connection.execute(statement).rowcount)


def _recover(connection: Connection, notice_id: str) -> int:
    """Under the sender lock, what a dead run left: claims released, rows in doubt marked unconfirmed."""
    _release_claims(connection, notice_id)
    doubtful = update(notice_deliveries).where(
        notice_deliveries.c.notice_id == notice_id, notice_deliveries.c.status == SENDING
    )
    unconfirmed = int(connection.execute(doubtful.values(status=UNCONFIRMED)).rowcount)
    if unconfirmed:
        _audit(
            connection,
            notice_id,
            "notice_recovered",
            "unconfirmed",
            {
                "unconfirmed": unconfirmed,
                "note": "handed to SMTP when a run died; maybe delivered; not resent (at most once)",
            },
            None,
        )
    return unconfirmed


def _pending(connection: Connection, notice_id: str) -> int:
    query = select(func.count()).where(
        notice_deliveries.c.notice_id == notice_id, notice_deliveries.c.status == PENDING
    )
    return int(connection.execute(query).scalar_one())


def _claim(
    connection: Connection, datamap: DataMap, notice: Notice, batch_size: int, now: datetime
) -> tuple[int, list[tuple[int, Pii]], dict[str, int]]:
    """Claim the next batch (lowest account ids first) and read their addresses; settle those without one."""
    notice_id = notice.id
    batch = int(
        connection.execute(
            select(func.coalesce(func.max(notice_deliveries.c.batch), 0) + 1).where(
                notice_deliveries.c.notice_id == notice_id
            )
        ).scalar_one()
    )
    next_ids = (
        select(notice_deliveries.c.account_id)
        .where(notice_deliveries.c.notice_id == notice_id, notice_deliveries.c.status == PENDING)
        .order_by(notice_deliveries.c.account_id)
        .limit(batch_size)
        .scalar_subquery()
    )
    claimed = sorted(
        connection.execute(
            update(notice_deliveries)
            .where(notice_deliveries.c.notice_id == notice_id, notice_deliveries.c.account_id.in_(next_ids))
            .values(status=CLAIMED, batch=batch, claimed_at=now)
            .returning(notice_deliveries.c.account_id)
        ).scalars()
    )
    subject = datamap.subject
    accounts = table_clause(datamap, subject.table)
    columns: list[ColumnElement[Any]] = [accounts.c[subject.id_column], accounts.c[subject.email_column]]
    deleted = datamap.subject.deleted_column if notice.kind == POLICY else None
    if deleted:
        columns.append(accounts.c[deleted].is_not(None).label("deleted"))
    found = {
        row[0]: row
        for row in connection.execute(select(*columns).where(accounts.c[subject.id_column].in_(claimed)))
    }
    recipients: list[tuple[int, Pii]] = []
    no_address, not_active = [], []
    for account_id in claimed:
        row = found.get(account_id)
        if row is None or not row[1]:
            no_address.append(account_id)
        elif deleted and row.deleted:
            not_active.append(account_id)
        else:
            recipients.append((account_id, Pii(str(row[1]))))
    _set_status(connection, notice_id, no_address, NO_ADDRESS)
    _set_status(connection, notice_id, not_active, NOT_ACTIVE)
    return (
        batch,
        recipients,
        {"claimed": len(claimed), "no_address": len(no_address), "not_active": len(not_active)},
    )


def notice_email(notice: Notice) -> tuple[str, notify.RenderedEmail]:
    """The notice's email (the same for every recipient): kind and rendering, from the stored content."""
    content = notice.content
    if notice.kind == BREACH:
        context = {
            "description": content["description"],
            "categories": [c["category"] for c in notice.report["categories"]],
            "consequences": content["likely_consequences"],
            "measures": content["measures_taken"],
            "detected_at": datetime.fromisoformat(content["detected_at"]),
            "advice": content.get("advice"),
        }
        return "breach_notice", notify.render_notice("breach_notice", notice.id, context)
    context = {
        "version": content["version"],
        "effective_on": date.fromisoformat(content["effective_on"]),
        "changes": content["changes"],
        "policy_url": content["policy_url"],
    }
    return "policy_notice", notify.render_notice("policy_notice", notice.id, context)


def send_batch(
    engine: Engine,
    smtp: notify.SmtpSettings,
    datamap: DataMap,
    notice_id: str,
    *,
    batch_size: int,
    rate_per_second: float,
    now: datetime,
) -> BatchReport:
    """Recover, claim and send one batch (see the module docstring). Raises NotificationError (the batch's
    unsent rest back to pending) when the SMTP server fails as a whole, NoticeBusy when another run sends."""
    notice = get_notice_or_fail(engine, notice_id)
    if notice.status not in ("selected", "completed"):
        raise NoticeError(f"{notice_id} has no recipients chosen (status {notice.status})")
    _, rendered = notice_email(notice)
    with sender_lock(engine, notice_id):
        with engine.begin() as connection:
            unconfirmed = _recover(connection, notice_id)
            batch, recipients, settled = _claim(connection, datamap, notice, batch_size, now)
        if not settled["claimed"]:
            return BatchReport(batch=None, unconfirmed=unconfirmed)
        sent, failed = _send_claimed(engine, smtp, notice_id, rendered, recipients, Pacer(rate_per_second), batch)
        with engine.begin() as connection:
            remaining = _pending(connection, notice_id)
            report = BatchReport(
                batch=batch,
                claimed=settled["claimed"],
                sent=sent,
                failed=failed,
                no_address=settled["no_address"],
                not_active=settled["not_active"],
                unconfirmed=unconfirmed,
                remaining=remaining,
            )
            _audit(connection, notice_id, "notice_batch", "sent", report.summary(), f"batch:{batch}")
    return report


# One recipient's step, as ONE autocommitted statement (atomic on its own, one round trip): the previous
# recipient's outcome (sent / failed) and the next one's 'sending' mark land together.
_ADVANCE = text(
    f"""
    UPDATE {SCHEMA}.notice_deliveries SET
        status = CASE WHEN account_id = CAST(:next AS bigint) THEN 'sending' ELSE CAST(:done_status AS text) END,
        sent_at = CASE WHEN account_id = CAST(:next AS bigint) THEN sent_at
                       WHEN CAST(:done_status AS text) = 'sent' THEN now() ELSE sent_at END,
        smtp_code = CASE WHEN account_id = CAST(:next AS bigint) THEN smtp_code
                         ELSE CAST(:done_code AS integer) END
    WHERE notice_id = :notice_id AND account_id IN (CAST(:done AS bigint), CAST(:next AS bigint))
    """
)


def _advance(
    connection: Connection, notice_id: str, done: tuple[int, str, int | None] | None, next_id: int | None
) -> None:
    if done is None and next_id is None:
        return
    account_id, status, code = done if done is not None else (None, None, None)
    connection.execute(
        _ADVANCE,
        {"notice_id": notice_id, "done": account_id, "done_status": status, "done_code": code, "next": next_id},
    )


def _send_claimed(
    engine: Engine,
    smtp: notify.SmtpSettings,
    notice_id: str,
    rendered: notify.RenderedEmail,
    recipients: list[tuple[int, Pii]],
    pacer: Pacer,
    batch: int,
) -> tuple[int, int]:
    """Send to the claimed recipients over one SMTP connection; returns (sent, failed)."""
    what = f"{notice_id} notice (batch {batch})"
    sent = failed = 0
    if not recipients:
        return sent, failed
    prepared = notify.prepare_notice(smtp, rendered)
    try:
        client = notify.connect_for_notices(smtp)
    except (OSError, notify.smtplib.SMTPException) as error:
        with engine.begin() as connection:
            _release_claims(connection, notice_id)
        raise notify.NotificationError(
            f"{what}: cannot reach SMTP server {smtp.host}:{smtp.port} ({type(error).__name__})"
        ) from None
    done: tuple[int, str, int | None] | None = None  # the previous recipient's outcome, written with the next mark
    try:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            for account_id, address in recipients:
                pacer.wait()
                _advance(connection, notice_id, done, account_id)
                done = None
                message_id = notify.notice_message_id(notice_id, account_id)
                try:
                    notify.send_on(client, smtp, prepared, address, message_id, what=what)
                except notify.RecipientRefused as error:
                    done, failed = (account_id, FAILED, error.smtp_code), failed + 1
                    continue
                except notify.DeliveryUncertain:
                    _set_status(connection, notice_id, [account_id], UNCONFIRMED)
                    _release_claims(connection, notice_id)
                    raise
                except notify.NotificationError:
                    _set_status(connection, notice_id, [account_id], CLAIMED)
                    _release_claims(connection, notice_id)
                    raise
                done, sent = (account_id, SENT, None), sent + 1
            _advance(connection, notice_id, done, None)
    finally:
        try:
            client.quit()
        except (notify.smtplib.SMTPException, OSError):
            client.close()
    return sent, failed


# ---------------------------------------------------------------------------------------------------------------
# Outcome
# ---------------------------------------------------------------------------------------------------------------


def delivery_counts(connection: Connection, notice_id: str) -> dict[str, int]:
    """Recipients per delivery status (every status listed, zeros included)."""
    rows = connection.execute(
        select(notice_deliveries.c.status, func.count())
        .where(notice_deliveries.c.notice_id == notice_id)
        .group_by(notice_deliveries.c.status)
    ).all()
    counts = dict.fromkeys(DELIVERY_STATUSES, 0)
    counts.update({status: int(n) for status, n in rows})
    return counts


def finish_notice(engine: Engine, notice_id: str, *, now: datetime) -> dict[str, int]:
    """When nobody is left to send to: the notice completed, its counts kept and audited (once). Returns counts."""
    with engine.begin() as connection:
        counts = delivery_counts(connection, notice_id)
        if any(counts[s] for s in OPEN_STATUSES):
            return counts
        connection.execute(
            update(notices)
            .where(notices.c.id == notice_id)
            .values(status="completed", outcome=counts, completed_at=func.coalesce(notices.c.completed_at, now))
        )
        _audit(connection, notice_id, "notice_completed", "completed", counts, "completed")
    return counts


def policy_recipients(connection: Connection, version: str) -> list[tuple[int, str, datetime | None]]:
    """Who was sent which version: (account id, status, sent_at) per account chosen for `version`."""
    rows = connection.execute(
        select(notice_deliveries.c.account_id, notice_deliveries.c.status, notice_deliveries.c.sent_at)
        .join(notices, notices.c.id == notice_deliveries.c.notice_id)
        .where(notices.c.policy_version == version)
        .order_by(notice_deliveries.c.account_id)
    ).all()
    return [(int(r.account_id), str(r.status), r.sent_at) for r in rows]


def _deadline_line(report: dict[str, Any], now: datetime) -> str:
    deadline = datetime.fromisoformat(report["authority_deadline"])
    hours = (deadline - now).total_seconds() / 3600
    when = f"{deadline:%Y-%m-%d %H:%M} UTC"
    if hours >= 0:
        return f"Notify the supervisory authority by {when} ({hours:.0f} hours left; GDPR art. 33(1))."
    return (
        f"The 72 hours ended {when} ({-hours:.0f} hours ago): notify the supervisory authority now and give the "
        "reasons for the delay (GDPR art. 33(1))."
    )


def authority_markdown(report: dict[str, Any], counts: dict[str, int] | None, now: datetime) -> str:
    """The supervisory authority's summary as a markdown artifact (counts and texts, no personal data)."""
    lines = [
        f"# Personal data breach {report['breach_id']}: summary for the supervisory authority",
        "",
        f"**{_deadline_line(report, now)}**",
        "",
        f"- Became aware: {report['detected_at']}",
        f"- Approximate number of people affected: **{report['people']}** accounts"
        + (
            f" ({report['deleted_accounts']} of them deleted, awaiting erasure)"
            if report["deleted_accounts"]
            else ""
        ),
        f"- Approximate number of records affected: **{report['records']}**",
        "",
        "## What happened",
        "",
        report["description"],
        "",
        "## Categories of personal data",
        "",
        "| category | records | tables |",
        "|---|---|---|",
        *(
            f"| {c['label']} | {c['records']} | "
            + ", ".join(f"{t} ({n})" for t, n in c["tables"].items() if n)
            + " |"
            for c in report["categories"]
        ),
    ]
    if report["elsewhere"]:
        lines += ["", "Also kept outside the database: " + "; ".join(report["elsewhere"]) + "."]
    lines += [
        "",
        "## Likely consequences",
        "",
        report["likely_consequences"],
        "",
        "## Measures taken or proposed",
        "",
        report["measures_taken"],
    ]
    if report.get("advice"):
        lines += ["", "## Advice given to the people affected", "", report["advice"]]
    if counts is not None:
        lines += [
            "",
            "## Communication to the people affected (GDPR art. 34)",
            "",
            "| sent | pending | unconfirmed | failed | no address |",
            "|---|---|---|---|---|",
            f"| {counts[SENT]} | {counts[PENDING] + counts[CLAIMED] + counts[SENDING]} | {counts[UNCONFIRMED]} | "
            f"{counts[FAILED]} | {counts[NO_ADDRESS]} |",
        ]
        if counts[UNCONFIRMED]:
            lines += [
                "",
                f"{counts[UNCONFIRMED]} notice(s) were being handed to the mail server when a run died: they may "
                "have been delivered and are not resent (`privacy_ops.notice_deliveries`, status unconfirmed).",
            ]
    lines += ["", f"Notice `{report['notice']}`, assessed {report['assessed_at']} for {report['requested_by']}."]
    return "\n".join(lines) + "\n"


def authority_email(report: dict[str, Any], now: datetime) -> tuple[str, str]:
    """Subject and plain-text body of the summary for compliance ops (to file with the supervisory authority)."""
    subject = (
        f"[privacy-ops] personal data breach {report['breach_id']}: {report['people']} people, notify the "
        f"authority by {datetime.fromisoformat(report['authority_deadline']):%Y-%m-%d %H:%M} UTC"
    )
    categories = [
        f"  - {c['label']}: {c['records']} records ("
        + ", ".join(f"{t} {n}" for t, n in c["tables"].items() if n)
        + ")"
        for c in report["categories"]
    ]
    body = [
        f"Personal data breach {report['breach_id']} (notice {report['notice']})",
        "",
        _deadline_line(report, now),
        "",
        f"Became aware: {report['detected_at']}",
        f"People affected (approximately): {report['people']} accounts",
        f"Records affected (approximately): {report['records']}",
        "",
        "What happened:",
        f"  {report['description']}",
        "",
        "Categories of personal data:",
        *categories,
        *([f"  Also outside the database: {'; '.join(report['elsewhere'])}"] if report["elsewhere"] else []),
        "",
        "Likely consequences:",
        f"  {report['likely_consequences']}",
        "",
        "Measures taken or proposed:",
        f"  {report['measures_taken']}",
        "",
        "Every affected person is being emailed now (GDPR art. 34); the Prefect artifact of the run shows the",
        "delivery counts, the stored record is privacy_ops.notices (report).",
    ]
    return subject, "\n".join(body) + "\n"

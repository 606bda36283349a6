"""Nightly retention, free of Prefect: locate what the data map's retention rules say has expired, act on it in
batches, report counts per rule and store.

For one rule and one `as_of` date, every batch is one transaction: select the next `batch_size` keys (accounts,
rows, export folders or requests) after the previous batch's last key (keyset pagination: memory is bounded by
the batch, whatever the table size), act on exactly those keys with set-based SQL, and append an audit entry keyed
`retention:<run id>:<rule>:<batch>` carrying the batch's counts, committed together. A run killed at any point and
resumed with the same run id finds its finished batches in the audit log: their counts are added to the report,
not redone, and numbering continues. Resuming restarts the key scan from the beginning, which is safe because
every action takes its rows out of the selection (deleted, anonymised, marked expired), so what was done is not
selected again and nothing is counted twice.

Account-level erasure (erase_account, erase_categories) works per batch of account ids: S3 prefixes purged
(every version) and Stripe customers erased first, then `stores.postgres.erase_accounts` over the whole batch, so a
crash between the two leaves the accounts selected and the rerun converges (S3 and Stripe find nothing left).
Every step of a batch is driven by the account id indexes and touches only the batch's accounts: erase_categories
takes a page of candidates, then keeps those still owning rows of its categories; S3 is listed only for accounts
still owning rows of the location's category, identifiers are collected only for accounts whose kept rows are
redacted with them, and the planner is told that random reads are cheap (see `_plan_for_batches`).

Dry run: the very same statements run inside one outer transaction that is rolled back at the end (a savepoint per
batch), so the counts are those the real run would produce, overlaps between rules included; S3 and Stripe are
only listed (what would be deleted), never changed, and nobody is emailed. Nothing is audited.

Safety: before a rule acts, the share of its table it would change is computed; above `max_share` the rule raises
`ApprovalRequired` (no change made) unless the caller passed it in `approved`.

Legal holds (`privacy_ops.legal_holds`): accounts under hold are never selected; row rules also skip rows of held
accounts and held rows (table + primary key). Account-level rules look at account holds only.
"""

from __future__ import annotations

import contextlib
import re
from collections import Counter
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError
from sqlalchemy import (
    ColumnElement,
    Text,
    and_,
    bindparam,
    case,
    cast,
    delete,
    exists,
    false,
    func,
    literal,
    or_,
    select,
    text,
    true,
    tuple_,
    union,
    union_all,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.sql.expression import Select, TableClause

from privacy_ops.checks import SubjectIdentifiers
from privacy_ops.datamap.loader import account_column
from privacy_ops.datamap.model import (
    ACCOUNT_ACTIONS,
    Anonymiser,
    Category,
    DataMap,
    FieldAction,
    Kind,
    RetentionAction,
    RetentionRule,
    RowAction,
    S3Location,
    Table,
)
from privacy_ops.datamap.sql import account_ids_param, reach_select, table_clause
from privacy_ops.lifecycle import audit
from privacy_ops.lifecycle.schema import (
    audit_log,
    legal_holds,
    requests,
    retained_records,
    subject_snapshots,
    verifications,
)
from privacy_ops.stores import postgres, stripe_store
from privacy_ops.stores import s3 as s3_store

DEFAULT_MAX_SHARE = 0.2
REDACTED = "[redacted]"
# What redact_contacts removes from free text: email addresses and IPv4/IPv6 addresses (PostgreSQL ARE).
CONTACT_PATTERN = (
    r"[[:alnum:]._%+-]+(@|%40)[[:alnum:]-]+(\.[[:alnum:]-]+)+"
    r"|(?<![[:alnum:].])([0-9]{1,3}\.){3}[0-9]{1,3}(?![[:alnum:]])"
    r"|(?<![[:alnum:]:])([0-9A-Fa-f]{1,4}:){2,7}[0-9A-Fa-f]{0,4}(?![[:alnum:]:])"
)
IPV4_PREFIX, IPV6_PREFIX = 24, 48
BATCH_RANDOM_PAGE_COST = 1.1  # see _plan_for_batches
# Rows per DELETE statement when erasing a batch of accounts. The batch already bounds the work (its accounts' own
# rows); erase_accounts' default chunks of 5,000 rows would only add statements, each re-reading the index entries
# of the rows the chunks before it deleted (they stay until vacuum).
ERASE_ROWS_PER_STATEMENT = 100_000
STEP = "retention"


class RetentionError(ValueError):
    """Bad input (unknown rule, future as_of, no retention section): nothing was changed."""


class ApprovalRequired(Exception):
    """A rule would change more than `max_share` of its table: nothing of it was changed."""

    def __init__(self, rule: str, table: str, rows: int, total: int, max_share: float) -> None:
        self.rule, self.table, self.rows, self.total, self.max_share = rule, table, rows, total, max_share
        super().__init__(
            f"rule {rule} would change {rows} of {total} rows of {table} "
            f"({rows / total:.0%} > {max_share:.0%}): approval needed"
        )


# ------------------------------------------------------------------------------------------------- reports
STORES = ("postgres", "s3", "stripe", "email")


@dataclass
class RuleReport:
    """What a rule changed (or would change, in a dry run): selected keys, changes per store and per table."""

    rule: str
    action: str
    dry_run: bool
    selected: int = 0  # accounts, rows, export folders or requests acted on
    stores: Counter[str] = field(default_factory=Counter)  # postgres rows, s3 versions, stripe customers, emails
    tables: Counter[str] = field(default_factory=Counter)  # postgres rows per table
    batches: int = 0
    resumed_batches: int = 0  # batches found done in the audit log (a resumed run)
    share: float | None = None
    needs_approval: bool = False

    def add(self, details: dict[str, Any]) -> None:
        self.selected += int(details.get("selected", 0))
        self.stores.update({k: int(v) for k, v in details.get("stores", {}).items()})
        self.tables.update({k: int(v) for k, v in details.get("tables", {}).items()})

    def summary(self) -> dict[str, Any]:
        """JSON-able, no personal data: for the audit log, the artifact and the email."""
        return {
            "rule": self.rule,
            "action": self.action,
            "dry_run": self.dry_run,
            "selected": self.selected,
            "stores": {store: int(self.stores.get(store, 0)) for store in STORES},
            "tables": dict(sorted(self.tables.items())),
            "batches": self.batches,
            "resumed_batches": self.resumed_batches,
            "share": self.share,
            "needs_approval": self.needs_approval,
        }


@dataclass(frozen=True)
class Clock:
    """The data map and the date rules are evaluated at: all that selecting what has expired needs."""

    datamap: DataMap
    as_of: date

    @property
    def moment(self) -> datetime:
        """The run's clock: midnight UTC at the start of `as_of`."""
        return datetime.combine(self.as_of, time(0), UTC)


@dataclass(frozen=True)
class Context(Clock):
    """What a retention run needs besides the clock: clients and the run id (audit keys)."""

    engine: Engine
    s3: Any
    stripe: Any
    settings: Any  # privacy_ops.settings.Settings: buckets and SMTP
    secret_key: str
    run_id: str


def check_as_of(as_of: date, today: date | None = None) -> date:
    """as_of may be today or earlier (the clock is moved back for tests and previews, never forward)."""
    today = today or datetime.now(UTC).date()
    if as_of > today:
        raise RetentionError(f"as_of {as_of.isoformat()} is in the future (today is {today.isoformat()})")
    return as_of


def rule_names(datamap: DataMap, wanted: Sequence[str] | None = None) -> list[str]:
    """The rules to run, in map order; unknown names raise RetentionError listing the known ones."""
    if datamap.retention is None:
        raise RetentionError("the data map has no retention section")
    known = list(datamap.retention.rules)
    if not wanted:
        return known
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise RetentionError(f"unknown retention rule(s): {', '.join(unknown)}; known: {', '.join(known)}")
    return [name for name in known if name in wanted]


def _rule(datamap: DataMap, name: str) -> RetentionRule:
    rule_names(datamap, [name])
    assert datamap.retention is not None
    return datamap.retention.rules[name]


def _batch_size(datamap: DataMap) -> int:
    return datamap.retention.batch_size if datamap.retention else 1000


# ------------------------------------------------------------------------------------------------- selection
def _years_before(day: date, years: int) -> date:
    try:
        return day.replace(year=day.year - years)
    except ValueError:  # 29 February
        return day.replace(year=day.year - years, day=28)


def _active_holds() -> ColumnElement[bool]:
    return legal_holds.c.lifted_at.is_(None)


def _row_key(target: TableClause, spec: Table) -> ColumnElement[str]:
    """The primary key as text, as retained_records and legal_holds write it ("a,b" for composite keys)."""
    return func.concat_ws(",", *(cast(target.c[k], Text) for k in spec.primary_key))


def expired(ctx: Clock, rule: RetentionRule, target: TableClause) -> ColumnElement[bool]:
    """Whether a row (an account) of `target` has expired under the rule, as of the context's date."""
    selected: list[ColumnElement[bool]] = []
    if rule.clock_column is not None and rule.period_days is not None:
        cutoff = ctx.moment - timedelta(days=rule.period_days)
        selected.append(target.c[rule.clock_column] < literal(cutoff))
    if rule.younger_than is not None:
        born_after = _years_before(ctx.as_of, rule.younger_than.years)
        selected.append(target.c[rule.younger_than.column] > literal(born_after))
    if rule.flag_column is not None:
        selected.append(target.c[rule.flag_column].is_(true()))
    if rule.without_consent is not None:
        consent = rule.without_consent
        consents = table_clause(ctx.datamap, consent.table)
        own = account_column(ctx.datamap.table(consent.table))
        row_account = account_column(ctx.datamap.table(target.name))
        assert own is not None and row_account is not None  # the loader checks both
        granted = (
            select(literal(1))
            .select_from(consents)
            .where(
                consents.c[own] == target.c[row_account],
                consents.c[consent.category_column] == literal(consent.category),
                consents.c[consent.granted_column].is_(true()),
            )
        )
        selected.append(~exists(granted))
    return or_(*selected) if selected else false()


def _not_anonymised(rule: RetentionRule, target: TableClause) -> ColumnElement[bool]:
    """Rows still holding something an anonymise rule removes: anonymised rows leave the selection for good."""
    pending: list[ColumnElement[bool]] = []
    for name, anonymiser in rule.columns.items():
        value = target.c[name]
        if anonymiser == Anonymiser.truncate_ip:
            pending.append(func.masklen(value) > ip_prefix(value))
        elif anonymiser == Anonymiser.set_null:
            pending.append(value.is_not(None))
        else:
            pending.append(value.op("~")(bindparam("contact_pattern", CONTACT_PATTERN, type_=Text)))
    return or_(*pending)


def ip_prefix(value: ColumnElement[Any]) -> ColumnElement[int]:
    """The prefix length an address is truncated to: /24 for IPv4, /48 for IPv6."""
    return case((func.family(value) == 4, IPV4_PREFIX), else_=IPV6_PREFIX)


def _not_held_account(ctx: Clock, account: ColumnElement[Any]) -> ColumnElement[bool]:
    return ~exists(select(literal(1)).where(_active_holds(), legal_holds.c.account_id == account))


def not_held_row(ctx: Clock, target: TableClause, spec: Table) -> ColumnElement[bool]:
    """Neither the row (table + primary key) nor its account is under an active legal hold."""
    held_row = select(literal(1)).where(
        _active_holds(), legal_holds.c.table_name == target.name, legal_holds.c.row_key == _row_key(target, spec)
    )
    condition = ~exists(held_row)
    account = account_column(spec)
    if account is not None:
        condition = and_(condition, _not_held_account(ctx, target.c[account]))
    return condition


def _owns_rows(
    datamap: DataMap, categories: Collection[Category], account: ColumnElement[Any]
) -> ColumnElement[bool]:
    """The account still owns a row (by a direct reach) in a table of the categories: erase_categories selects
    only accounts with something left to erase, so a finished account leaves the selection. Each test is an
    EXISTS on the reach column's index, cheap per account when applied to a page of candidates."""
    found = []
    for name, spec in datamap.postgres.tables.items():
        if spec.category not in categories:
            continue
        target = table_clause(datamap, name)
        for reach in spec.reaches:
            if reach.through is None:
                found.append(
                    exists(select(literal(1)).select_from(target).where(target.c[reach.column] == account))
                )
    return or_(*found) if found else false()


def _expired_accounts(ctx: Clock, rule: RetentionRule, accounts: TableClause) -> Select[Any]:
    """SELECT of the ids of the accounts the rule's conditions select now, held ones excluded."""
    id_column = accounts.c[ctx.datamap.subject.id_column]
    return select(id_column).where(expired(ctx, rule, accounts), _not_held_account(ctx, id_column))


def selection(ctx: Clock, rule: RetentionRule) -> tuple[TableClause, list[str], Select[Any]]:
    """(table, key columns, SELECT of the keys of everything the rule selects now, held ones excluded)."""
    datamap = ctx.datamap
    assert rule.table is not None
    target = table_clause(datamap, rule.table)
    spec = datamap.table(rule.table)
    if rule.action in ACCOUNT_ACTIONS:
        keys = [datamap.subject.id_column]
        query = _expired_accounts(ctx, rule, target)
        if rule.action == RetentionAction.erase_categories:
            query = query.where(_owns_rows(datamap, rule.categories, target.c[keys[0]]))
        return target, keys, query
    keys = list(spec.primary_key)
    where = [expired(ctx, rule, target), not_held_row(ctx, target, spec)]
    if rule.action == RetentionAction.anonymise_columns:
        where.append(_not_anonymised(rule, target))
    return target, keys, select(*(target.c[k] for k in keys)).where(*where)


def _after(target: TableClause, keys: list[str], cursor: tuple[Any, ...] | None) -> ColumnElement[bool]:
    if cursor is None:
        return true()
    if len(keys) == 1:
        return target.c[keys[0]] > literal(cursor[0])
    return tuple_(*(target.c[k] for k in keys)) > tuple_(*(literal(v) for v in cursor))


# ------------------------------------------------------------------------------------------------- preview / share
@dataclass(frozen=True)
class Share:
    rule: str
    table: str | None
    rows: int  # what the rule selects now
    total: int  # rows of the table

    @property
    def share(self) -> float:
        return self.rows / self.total if self.total else 0.0


def measure_share(ctx: Context, name: str) -> Share:
    """How much of its table a rule would change now (two counts in one statement, nothing read into memory)."""
    rule = _rule(ctx.datamap, name)
    if rule.table is None:  # S3 folders and privacy requests: no CellCMS table to protect
        return Share(name, None, 0, 0)
    target, _, keys = selection(ctx, rule)
    counts = select(
        select(func.count()).select_from(keys.subquery()).scalar_subquery(),
        select(func.count()).select_from(target).scalar_subquery(),
    )
    with ctx.engine.connect() as connection:
        rows, total = connection.execute(counts).one()
    return Share(name, rule.table, int(rows), int(total))


# ------------------------------------------------------------------------------------------------- sessions
class _Session:
    """Where batches run: their own committed transactions, or (dry run) savepoints of one rolled-back one."""

    def __init__(self, engine: Engine, dry_run: bool) -> None:
        self.engine, self.dry_run = engine, dry_run
        self._connection: Connection | None = None
        # Dry run: what earlier rules of this run would already have purged or erased (bounded by the accounts
        # acted on), so that a later rule does not count it again.
        self.purged_prefixes: set[tuple[str, str]] = set()
        self.erased_customers: set[str] = set()

    @contextlib.contextmanager
    def open(self) -> Iterator[_Session]:
        if not self.dry_run:
            yield self
            return
        with self.engine.connect() as connection:
            transaction = connection.begin()
            self._connection = connection
            try:
                yield self
            finally:
                self._connection = None
                transaction.rollback()

    @contextlib.contextmanager
    def batch(self) -> Iterator[Connection]:
        if self._connection is not None:
            with self._connection.begin_nested():
                _plan_for_batches(self._connection)
                yield self._connection
        else:
            with self.engine.begin() as connection:
                _plan_for_batches(connection)
                yield connection


def _plan_for_batches(connection: Connection) -> None:
    """Cost random reads as the cached, index-driven reads a batch makes (until its transaction ends).

    A batch touches a few rows per account of each table through the account id indexes. Under PostgreSQL's
    default random_page_cost (4, spinning disks) the planner prices a thousand index probes above one whole-table
    scan and answers the erasure's `DELETE ... WHERE key IN (SELECT ... LIMIT n)` with a hash join over the whole
    table, on every batch: measured at 100,000 accounts, 0.2 to 1.4 s per table and batch, against 10 to 100 ms
    by the indexes, which the planner picks at 1.1."""
    connection.execute(text(f"SET LOCAL random_page_cost = {BATCH_RANDOM_PAGE_COST}"))


def _batch_key(run_id: str, rule: str, batch: int) -> str:
    return f"retention:{run_id}:{rule}:{batch}"


def _recorded(ctx: Context, rule: str) -> list[dict[str, Any]]:
    """Details of the batches of this run and rule already committed (a resumed run), in batch order."""
    prefix = _batch_key(ctx.run_id, rule, 0)[:-1].replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    with ctx.engine.connect() as connection:
        rows = connection.execute(
            select(audit_log.c.details).where(audit_log.c.idempotency_key.like(prefix + "%", escape="\\"))
        ).scalars()
        return sorted((dict(r) for r in rows), key=lambda d: int(d.get("batch", 0)))


# ------------------------------------------------------------------------------------------------- apply
def apply_rule(
    ctx: Context,
    name: str,
    *,
    dry_run: bool = False,
    max_share: float = DEFAULT_MAX_SHARE,
    approved: bool = False,
    max_batches: int | None = None,
    session: _Session | None = None,
    share: Share | None = None,
) -> RuleReport:
    """Locate and act (or preview) one rule, batch by batch; see the module docstring. `max_batches` stops early
    (throttling, and tests simulating a crash); a later call with the same run id continues. `share` is the
    caller's `measure_share` of the rule just before (the flow measures to ask for approval): not counted again."""
    rule = _rule(ctx.datamap, name)
    report = RuleReport(name, rule.action.value, dry_run)
    share = share or measure_share(ctx, name)
    report.share = round(share.share, 4) if share.table else None
    if share.table is not None and share.share > max_share and not approved:
        if not dry_run:
            assert share.table is not None
            raise ApprovalRequired(name, share.table, share.rows, share.total, max_share)
        report.needs_approval = True
    own = session is None
    session = session or _Session(ctx.engine, dry_run)
    batch_no = 0
    if not dry_run:
        for details in _recorded(ctx, name):
            report.add(details)
            report.resumed_batches += 1
            batch_no = max(batch_no, int(details.get("batch", 0)))
    with session.open() if own else contextlib.nullcontext(session):
        cursor: Any = None
        while max_batches is None or report.batches < max_batches:
            batch_no += 1
            with session.batch() as connection:
                done, cursor, details = _act_batch(ctx, session, connection, name, rule, cursor)
                if done:
                    break
                details = {"rule": name, "batch": batch_no, **details}
                if not dry_run:
                    audit.record(
                        connection,
                        step=STEP,
                        outcome=name,
                        request_id=None,
                        subject_hash=None,
                        details=details,
                        idempotency_key=_batch_key(ctx.run_id, name, batch_no),
                    )
            report.add(details)
            report.batches += 1
    return report


def run_retention(
    ctx: Context,
    rules: Sequence[str] | None = None,
    *,
    dry_run: bool = False,
    max_share: float = DEFAULT_MAX_SHARE,
    approved: Sequence[str] = (),
) -> list[RuleReport]:
    """Every rule (or the named ones) in map order. A dry run previews them all in one rolled-back transaction,
    so a rule's counts account for what earlier rules would change."""
    names = rule_names(ctx.datamap, rules)
    check_as_of(ctx.as_of)
    if not 0 < max_share <= 1:
        raise RetentionError("max_share must be in (0, 1]")
    session = _Session(ctx.engine, dry_run)
    with session.open():
        return [
            apply_rule(ctx, n, dry_run=dry_run, max_share=max_share, approved=n in approved, session=session)
            for n in names
        ]


def _act_batch(
    ctx: Context, session: _Session, connection: Connection, name: str, rule: RetentionRule, cursor: Any
) -> tuple[bool, Any, dict[str, Any]]:
    """One batch: (no more work, new cursor, counts)."""
    if rule.action == RetentionAction.purge_objects:
        return _purge_objects_batch(ctx, session, rule, cursor)
    if rule.action == RetentionAction.expire_requests:
        return _expire_requests_batch(ctx, connection, cursor)
    if rule.action in ACCOUNT_ACTIONS:
        ids, cursor = _account_batch(ctx, connection, rule, cursor)
        if not ids:
            return True, cursor, {}
        return False, cursor, _erase_accounts_batch(ctx, session, connection, rule, ids)
    target, keys, query = selection(ctx, rule)
    size = _batch_size(ctx.datamap)
    batch = query.where(_after(target, keys, cursor)).order_by(*(target.c[k] for k in keys)).limit(size)
    chosen = batch.subquery("chosen")
    match = tuple_(*(target.c[k] for k in keys)).in_(select(*(chosen.c[k] for k in keys)))
    returning = [target.c[k] for k in keys]
    if rule.action == RetentionAction.delete_rows:
        statement: Any = delete(target).where(match).returning(*returning)
    else:
        statement = update(target).where(match).values(_anonymised_values(rule, target)).returning(*returning)
    changed = [tuple(row) for row in connection.execute(statement, {"contact_pattern": CONTACT_PATTERN})]
    if not changed:
        return True, cursor, {}
    tables = Counter({target.name: len(changed)})
    if rule.action == RetentionAction.delete_rows:
        # Rows kept under a legal basis after an erasure are listed with their purge date: purged now, unlisted.
        row_keys = [",".join(str(v) for v in key) for key in changed]
        gone = connection.execute(
            delete(retained_records).where(
                retained_records.c.table_name == target.name, retained_records.c.row_key.in_(row_keys)
            )
        ).rowcount
        if gone:
            tables["privacy_ops.retained_records"] += gone
    return (
        False,
        max(changed),
        {"selected": len(changed), "stores": {"postgres": sum(tables.values())}, "tables": tables},
    )


def _account_batch(
    ctx: Context, connection: Connection, rule: RetentionRule, cursor: Any
) -> tuple[list[int], Any]:
    """The next accounts to act on after `cursor`, and the new cursor ([] when none is left).

    erase_categories takes the next page of candidates (expired, not held: a keyset scan of the id index) and keeps
    those still owning rows of its categories, tested per candidate on the reach columns' indexes: the same test
    over the whole selection hashes whole tables on every batch. A page owning nothing (accounts finished before a
    resumed run) is passed over within the same batch."""
    accounts = table_clause(ctx.datamap, ctx.datamap.subject.table)
    key = ctx.datamap.subject.id_column
    while True:
        page = (
            _expired_accounts(ctx, rule, accounts)
            .where(_after(accounts, [key], cursor))
            .order_by(accounts.c[key])
            .limit(_batch_size(ctx.datamap))
        )
        if rule.action == RetentionAction.erase_account:
            ids = [int(i) for i in connection.execute(page).scalars()]
            return ids, ((ids[-1],) if ids else cursor)
        candidates = page.subquery("candidates")
        owns = _owns_rows(ctx.datamap, rule.categories, candidates.c[key])
        rows = connection.execute(select(candidates.c[key], owns).order_by(candidates.c[key])).all()
        if not rows:
            return [], cursor
        cursor = (int(rows[-1][0]),)
        ids = [int(account_id) for account_id, owned in rows if owned]
        if ids:
            return ids, cursor


def _anonymised_values(rule: RetentionRule, target: TableClause) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, anonymiser in rule.columns.items():
        value = target.c[name]
        if anonymiser == Anonymiser.truncate_ip:
            prefix = ip_prefix(value)
            # network() of the address at the prefix: 192.0.2.77 -> 192.0.2.0/24 (the /24 marks it anonymised).
            values[name] = func.network(func.set_masklen(value, prefix))
        elif anonymiser == Anonymiser.set_null:
            values[name] = None
        else:
            values[name] = func.regexp_replace(
                value, bindparam("contact_pattern", CONTACT_PATTERN, type_=Text), REDACTED, "g"
            )
    return values


# ------------------------------------------------------------------------------------------------- accounts
def _restricted(datamap: DataMap, categories: Sequence[Category]) -> DataMap:
    """The map reduced to the tables (and S3 locations) of `categories`; the subject table stays, without reaches,
    so the erasure order still knows it but never touches it."""
    tables = {n: t for n, t in datamap.postgres.tables.items() if t.category in categories}
    subject = datamap.subject.table
    if subject not in tables:
        accounts = datamap.table(subject)
        tables[subject] = Table(category=accounts.category, primary_key=accounts.primary_key, reaches=[])
    s3 = {n: loc for n, loc in datamap.s3.items() if loc.category in categories}
    return datamap.model_copy(
        update={"postgres": datamap.postgres.model_copy(update={"tables": tables}), "s3": s3}
    )


def _owning(connection: Connection, datamap: DataMap, category: Category, ids: list[int]) -> list[int]:
    """Those of `ids` still owning rows of the category (see `_owns_rows`): one query."""
    given = func.unnest(account_ids_param()).table_valued("account_id").render_derived(name="given")
    query = select(given.c.account_id).where(_owns_rows(datamap, [category], given.c.account_id))
    return [int(i) for i in connection.execute(query, {"account_ids": ids}).scalars()]


def _s3_targets(
    ctx: Context, connection: Connection, locations: dict[str, S3Location], ids: list[int]
) -> list[tuple[str, str]]:
    """(bucket, prefix) per location for the accounts still owning rows of its category. Every batch purges S3
    before PostgreSQL, so an account owning none had its prefix purged with them: listed again, it would cost an
    S3 request per account (most of a batch, after the content rule) to find nothing."""
    return [
        (getattr(ctx.settings, location.bucket_setting), location.prefix.format(account_id=account_id))
        for location in locations.values()
        for account_id in _owning(connection, ctx.datamap, location.category, ids)
    ]


def _with_kept_text(connection: Connection, datamap: DataMap, ids: list[int]) -> list[int]:
    """Those of `ids` owning rows that the erasure keeps and redacts of their identifiers (a `redact_identifiers`
    column of a row reached by an anonymise or retain reach, and not deleted by another reach of the batch): the
    only accounts whose identifiers are needed. One query; none when the map keeps no such rows."""
    kept: list[Select[Any]] = []
    for name, spec in datamap.postgres.tables.items():
        if not any(c.erasure == FieldAction.redact_identifiers for c in spec.columns.values()):
            continue
        deleting = [i for i, reach in enumerate(spec.reaches) if reach.erasure == RowAction.delete_row]
        for index, reach in enumerate(spec.reaches):
            if reach.erasure == RowAction.delete_row:
                continue
            rows = reach_select(datamap, name, index, with_account_id=True).subquery()
            query = select(rows.c.account_id)
            if deleting:
                key = [rows.c[k] for k in spec.primary_key]
                deleted = union_all(*(reach_select(datamap, name, i) for i in deleting))
                query = query.where((tuple_(*key) if len(key) > 1 else key[0]).not_in(deleted))
            kept.append(query)
    if not kept:
        return []
    found = connection.execute(union(*kept), {"account_ids": ids}).scalars()
    return sorted({int(i) for i in found})


def _customer_ids(ctx: Context, connection: Connection, ids: list[int]) -> list[str]:
    stripe_map = ctx.datamap.stripe
    if stripe_map is None:
        return []
    profiles = table_clause(ctx.datamap, stripe_map.customer_id_table)
    account = account_column(ctx.datamap.table(stripe_map.customer_id_table))
    assert account is not None
    column = profiles.c[stripe_map.customer_id_column]
    query = select(column).where(profiles.c[account].in_(ids), column.is_not(None))
    return [str(c) for c in connection.execute(query).scalars() if c]


def _erase_accounts_batch(
    ctx: Context, session: _Session, connection: Connection, rule: RetentionRule, ids: list[int]
) -> dict[str, Any]:
    datamap = (
        ctx.datamap if rule.action == RetentionAction.erase_account else _restricted(ctx.datamap, rule.categories)
    )
    stores: Counter[str] = Counter()
    request_id = f"retention-{ctx.run_id}"
    if rule.notify_subject:
        stores["email"] += _notify(ctx, session, connection, ids)
    for bucket, prefix in _s3_targets(ctx, connection, datamap.s3, ids) if datamap.s3 else ():
        if session.dry_run:
            if (bucket, prefix) not in session.purged_prefixes:
                session.purged_prefixes.add((bucket, prefix))
                stores["s3"] += len(s3_store.list_versions(ctx.s3, bucket, prefix))
        else:
            purged = s3_store.purge_prefix(ctx.s3, bucket, prefix)
            stores["s3"] += purged.versions_deleted + purged.delete_markers_deleted
    if datamap.stripe is not None and rule.action == RetentionAction.erase_account:
        for customer_id in _customer_ids(ctx, connection, ids):
            if session.dry_run:
                if customer_id not in session.erased_customers:
                    session.erased_customers.add(customer_id)
                    stores["stripe"] += int(stripe_store._retrieve_customer(ctx.stripe, customer_id) is not None)
            else:
                stores["stripe"] += int(
                    stripe_store.erase_customer(ctx.stripe, customer_id, request_id).customer_deleted
                )
    # Each kept row (a document they wrote in someone else's project) is redacted with its own account's
    # identifiers, those of the full map: collected only for the accounts with such rows, often none of the
    # batch. The global mention pass is skipped: see erase_accounts(redact_mentions=...) and the report.
    kept = _with_kept_text(connection, datamap, ids)
    by_account = postgres.identifiers_by_account(connection, ctx.datamap, kept) if kept else {}
    subject = SubjectIdentifiers.from_kinds(
        {kind: {v for kinds in by_account.values() for v in kinds.get(kind, ())} for kind in Kind}, account_ids=ids
    )
    erasure = postgres.erase_accounts(
        connection,
        datamap,
        account_ids=ids,
        subject=subject,
        secret_key=ctx.secret_key,
        request_id=request_id,
        batch_size=ERASE_ROWS_PER_STATEMENT,
        redact_mentions=False,
        identifiers=by_account,
    )
    tables = Counter({name: counts.total() for name, counts in erasure.tables.items() if counts.total()})
    stores["postgres"] += sum(tables.values())
    return {"selected": len(ids), "stores": dict(stores), "tables": dict(tables)}


def _notify(ctx: Context, session: _Session, connection: Connection, ids: list[int]) -> int:
    """Tell each person (where an address is on file) that their account is being deleted; returns how many."""
    from privacy_ops.lifecycle import notify

    subject = ctx.datamap.subject
    accounts = table_clause(ctx.datamap, subject.table)
    column = accounts.c[subject.email_column]
    addresses = [
        a for a in connection.execute(select(column).where(accounts.c[subject.id_column].in_(ids))).scalars() if a
    ]
    if session.dry_run:
        return len(addresses)
    for address in addresses:
        notify.send_operator_mail(
            ctx.settings,
            address,
            "Your CellCMS account has been deleted",
            "CellCMS is not intended for anyone under 16 (privacy policy, section 8). We have learned that this "
            "account may belong to someone younger, so we have deleted it and the personal data it held.\n\n"
            "If you are 16 or older, or a parent or guardian with a question, contact privacy@cellcms.com.\n",
        )
    return len(addresses)


# ------------------------------------------------------------------------------------------------- S3 exports
_FOLDER = re.compile(r"^[^/]+/$")


def _purge_objects_batch(
    ctx: Context, session: _Session, rule: RetentionRule, cursor: Any
) -> tuple[bool, Any, dict[str, Any]]:
    """The next folders under the rule's prefix (keyset by name) whose newest version is past the period: every
    version purged. An export package is one folder per request (exports/<request id>/)."""
    assert rule.bucket_setting is not None and rule.period_days is not None
    bucket = getattr(ctx.settings, rule.bucket_setting)
    cutoff = ctx.moment - timedelta(days=rule.period_days)
    size = _batch_size(ctx.datamap)
    start_after = cursor[0] if cursor else rule.prefix
    purged = versions = examined = 0
    last = start_after
    while examined < size:
        try:
            page = ctx.s3.list_objects_v2(
                Bucket=bucket, Prefix=rule.prefix, Delimiter="/", StartAfter=last, MaxKeys=min(1000, size)
            )
        except (ClientError, BotoCoreError) as error:
            if isinstance(error, ClientError) and error.response.get("Error", {}).get("Code") == "NoSuchBucket":
                break  # no export was ever made: nothing to purge
            s3_store.raise_store_error("list folders", f"{bucket}/{rule.prefix}", error)
        folders = [p["Prefix"] for p in page.get("CommonPrefixes", []) if p["Prefix"] > last]
        if not folders:
            break
        for folder in folders[: size - examined]:
            examined += 1
            last = folder
            listing = s3_store.list_versions(ctx.s3, bucket, folder)
            if not listing or max(v.last_modified for v in listing) >= cutoff:
                continue
            if session.dry_run:
                count = len(listing) if (bucket, folder) not in session.purged_prefixes else 0
                session.purged_prefixes.add((bucket, folder))
            else:
                result = s3_store.purge_prefix(ctx.s3, bucket, folder)
                count = result.versions_deleted + result.delete_markers_deleted
            purged += 1
            versions += count
        # StartAfter the folder's own keys: "x/" -> "x0" sorts after every "x/..." key and before the next folder
        # ("0" follows "/" in ASCII). Plain ASCII: moto answers 500 to non-ASCII markers.
        last = last[:-1] + "0" if last.endswith("/") else last
        if not page.get("IsTruncated"):
            break
    if examined == 0:
        return True, cursor, {}
    return False, (last,), {"selected": purged, "stores": {"s3": versions}, "tables": {}}


# ------------------------------------------------------------------------------------------------- requests
def _expire_requests_batch(ctx: Context, connection: Connection, cursor: Any) -> tuple[bool, Any, dict[str, Any]]:
    """Requests still awaiting a verification that expired before the run's clock: verification expired,
    request denied (the person can ask again). The flow that started them, if still paused, finds them final."""
    pending = ("received", "awaiting_verification")
    query = (
        select(requests.c.id)
        .join(verifications, verifications.c.request_id == requests.c.id)
        .where(
            verifications.c.status == "pending",
            verifications.c.expires_at < literal(ctx.moment),
            requests.c.status.in_(pending),
            requests.c.id > literal(cursor[0] if cursor else ""),
        )
        .order_by(requests.c.id)
        .limit(_batch_size(ctx.datamap))
    )
    ids = list(connection.execute(query).scalars())
    if not ids:
        return True, cursor, {}
    now = datetime.now(UTC)
    connection.execute(
        update(verifications)
        .where(verifications.c.request_id.in_(ids), verifications.c.status == "pending")
        .values(status="expired", updated_at=now)
    )
    denied = connection.execute(
        update(requests)
        .where(requests.c.id.in_(ids), requests.c.status.in_(pending))
        .values(
            status="denied",
            completed_at=now,
            outcome=requests.c.outcome.op("||")(
                cast(literal('{"denied": "verification expired (retention)"}'), requests.c.outcome.type)
            ),
        )
    ).rowcount
    # What an erasure or rectification kept for the request (encrypted) is no longer needed. A deployed run whose
    # code expired was failed by Prefect while suspended, so no step of its own got to delete it.
    forgotten = connection.execute(
        delete(subject_snapshots).where(subject_snapshots.c.request_id.in_(ids))
    ).rowcount
    return (
        False,
        (ids[-1],),
        {
            "selected": denied,
            "stores": {"postgres": 2 * denied + forgotten},
            "tables": {
                "privacy_ops.requests": denied,
                "privacy_ops.verifications": denied,
                "privacy_ops.subject_snapshots": forgotten,
            },
            "requests": ids,
        },
    )


__all__ = [
    "CONTACT_PATTERN",
    "DEFAULT_MAX_SHARE",
    "ApprovalRequired",
    "Clock",
    "Context",
    "RetentionError",
    "RuleReport",
    "Share",
    "apply_rule",
    "check_as_of",
    "expired",
    "ip_prefix",
    "measure_share",
    "not_held_row",
    "rule_names",
    "run_retention",
    "selection",
]


def export_leftovers(ctx: Context, names: Sequence[str]) -> list[str]:
    """Folders of purge_objects rules still holding a version past their period (what the check must not find).
    Names of folders only (request ids), never object contents."""
    found: list[str] = []
    for name in names:
        rule = _rule(ctx.datamap, name)
        if rule.action != RetentionAction.purge_objects or rule.bucket_setting is None or rule.period_days is None:
            continue
        bucket = getattr(ctx.settings, rule.bucket_setting)
        cutoff = ctx.moment - timedelta(days=rule.period_days)
        paginator = ctx.s3.get_paginator("list_object_versions")
        try:
            pages = list(paginator.paginate(Bucket=bucket, Prefix=rule.prefix))
        except ctx.s3.exceptions.NoSuchBucket:
            pages = []  # no export was ever made
        newest: dict[str, datetime] = {}
        for page in pages:
            for item in [*page.get("Versions", []), *page.get("DeleteMarkers", [])]:
                folder = rule.prefix + item["Key"][len(rule.prefix) :].split("/", 1)[0] + "/"
                newest[folder] = max(newest.get(folder, item["LastModified"]), item["LastModified"])
        held = _held_folders(ctx)
        found += [f for f, moment in sorted(newest.items()) if moment < cutoff and f not in held]
    return found


def _held_folders(ctx: Context) -> set[str]:
    del ctx  # export folders cannot be held (yet): a hold names an account or a CellCMS row
    return set()

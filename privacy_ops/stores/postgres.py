"""The CellCMS PostgreSQL store, driven entirely by the data map: locate, export and erase a subject's rows.

Everything is set-based SQL over the account ids of the subject (one person for a request, many for bulk jobs):
no statement per row. Functions take a Connection and never commit: the caller's transaction makes an erasure all
or nothing.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    Date,
    Select,
    Text,
    any_,
    bindparam,
    case,
    cast,
    delete,
    func,
    literal,
    select,
    union,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, insert
from sqlalchemy.engine import Connection
from sqlalchemy.sql.expression import ColumnElement, TableClause

from privacy_ops.checks import SubjectIdentifiers, text_pattern
from privacy_ops.datamap.loader import known_columns
from privacy_ops.datamap.model import Column, DataMap, FieldAction, Kind, Reach, RowAction
from privacy_ops.datamap.sql import account_ids_param, primary_key_in, reach_select, table_clause
from privacy_ops.lifecycle.schema import retained_records
from privacy_ops.pii import PSEUDONYM_LENGTH, PSEUDONYM_PREFIX, PSEUDONYM_PURPOSE

REDACTED = "[redacted]"
NEVER_MATCHES = "(?!)"  # the pattern of an account without identifiers
WITHHELD = "[withheld: security credential]"
OTHER_ACCOUNT = "[another account]"
BATCH_SIZE = 5000


# --------------------------------------------------------------------------------------------------------------
# Locate


def find_accounts(
    connection: Connection, datamap: DataMap, *, email: str | None, account_id: int | None
) -> list[int]:
    """Account ids matching the identity given (email, case-insensitive, or account id). [] = no data held."""
    subject = datamap.subject
    accounts = table_clause(datamap, subject.table)
    id_column = accounts.c[subject.id_column]
    query = select(id_column).order_by(id_column)
    if email is not None:
        query = query.where(func.lower(accounts.c[subject.email_column]) == email.strip().lower())
    if account_id is not None:
        query = query.where(id_column == account_id)
    return list(connection.execute(query).scalars())


def subject_email(connection: Connection, datamap: DataMap, account_id: int) -> str | None:
    """The email address on file: where verification codes and answers go."""
    subject = datamap.subject
    accounts = table_clause(datamap, subject.table)
    return connection.execute(
        select(accounts.c[subject.email_column]).where(accounts.c[subject.id_column] == account_id)
    ).scalar_one_or_none()


def _reached_keys(datamap: DataMap, table_name: str, reaches: Iterable[int] | None = None) -> Select[Any]:
    """The primary keys of every row of the table reaching the accounts, over the chosen reaches (default all)."""
    indexes = list(reaches) if reaches is not None else range(len(datamap.table(table_name).reaches))
    selects = [reach_select(datamap, table_name, i) for i in indexes]
    return selects[0] if len(selects) == 1 else union(*selects).subquery().select()


def count_records(connection: Connection, datamap: DataMap, account_ids: list[int]) -> dict[str, int]:
    """Rows per mapped table that belong to the accounts: what locate reports before anything is revealed."""
    counts = {}
    for name in datamap.postgres.tables:
        keys = _reached_keys(datamap, name).subquery()
        counts[name] = connection.execute(
            select(func.count()).select_from(keys), {"account_ids": account_ids}
        ).scalar_one()
    return counts


def column_values(
    connection: Connection, datamap: DataMap, table_name: str, column_name: str, account_ids: list[int]
) -> set[str]:
    """Distinct non-null values of one column over the accounts' rows (IP addresses rendered by host())."""
    target = table_clause(datamap, table_name)
    value = target.c[column_name]
    spec = datamap.table(table_name).columns.get(column_name)
    rendered = func.host(value) if spec is not None and spec.kind == Kind.ip else cast(value, Text)
    query = (
        select(rendered)
        .distinct()
        .where(primary_key_in(datamap, target, _reached_keys(datamap, table_name)))
        .where(value.is_not(None))
    )
    return {str(v) for v in connection.execute(query, {"account_ids": account_ids}).scalars()}


def identifiers_by_account(
    connection: Connection, datamap: DataMap, account_ids: list[int]
) -> dict[int, dict[Kind, set[str]]]:
    """Every identifier value of each account, by kind (one query per identifier column and reach)."""
    found: dict[int, dict[Kind, set[str]]] = defaultdict(lambda: defaultdict(set))
    for table_name, column_name, spec in datamap.identifier_columns():
        for index in range(len(datamap.table(table_name).reaches)):
            rows = reach_select(datamap, table_name, index, columns=[column_name], with_account_id=True).subquery()
            value = rows.c[column_name]
            rendered = func.host(value) if spec.kind == Kind.ip else cast(value, Text)
            query = select(rows.c.account_id, rendered).distinct().where(value.is_not(None))
            for account_id, text_value in connection.execute(query, {"account_ids": account_ids}):
                found[account_id][spec.kind].add(str(text_value))
    return found


def collect_identifiers(connection: Connection, datamap: DataMap, account_ids: list[int]) -> dict[Kind, set[str]]:
    """Every identifier value of the subject, by kind: what erasure redacts and what checks hunt for afterwards."""
    merged: dict[Kind, set[str]] = defaultdict(set)
    for kinds in identifiers_by_account(connection, datamap, account_ids).values():
        for kind, values in kinds.items():
            merged[kind] |= values
    return dict(merged)


# --------------------------------------------------------------------------------------------------------------
# Access: stream a table's rows of the subject


@dataclass(frozen=True)
class TableExport:
    table: str
    category: str
    columns: list[str]
    rows: Iterator[tuple[Any, ...]]


def _export_expression(
    datamap: DataMap, target: TableClause, name: str, spec: Column | None
) -> ColumnElement[Any]:
    """The value a column shows in the access package: secrets withheld, other people's account ids masked."""
    value = target.c[name]
    if spec is not None and not spec.exported:
        return case((value.is_(None), None), else_=literal(WITHHELD)).label(name)
    if (spec is not None and spec.kind == Kind.account_ref) or _is_account_column(datamap, target.name, name):
        mine = value == any_(account_ids_param())
        return case((value.is_(None), None), (mine, cast(value, Text)), else_=literal(OTHER_ACCOUNT)).label(name)
    return value.label(name)


def _is_account_column(datamap: DataMap, table_name: str, column_name: str) -> bool:
    return any(r.through is None and r.column == column_name for r in datamap.table(table_name).reaches)


def export_table(connection: Connection, datamap: DataMap, table_name: str, account_ids: list[int]) -> TableExport:
    """The subject's rows of one table, streamed from a server-side cursor (memory stays flat)."""
    spec = datamap.table(table_name)
    target = table_clause(datamap, table_name)
    names = known_columns(spec)  # primary key, reach columns (the link to the account) and mapped columns
    selected = [_export_expression(datamap, target, name, spec.columns.get(name)) for name in names]
    query = (
        select(*selected)
        .where(primary_key_in(datamap, target, _reached_keys(datamap, table_name)))
        .order_by(*(target.c[k] for k in spec.primary_key))
    )
    result = connection.execute(
        query, {"account_ids": account_ids}, execution_options={"stream_results": True, "yield_per": 2000}
    )
    return TableExport(table_name, spec.category.value, names, (tuple(row) for row in result))


# --------------------------------------------------------------------------------------------------------------
# Mentions: the subject's identifiers in rows that are not theirs (free text, logs without an account)


@dataclass(frozen=True)
class Mention:
    table: str
    column: str
    rows: int


def find_mentions(
    connection: Connection, datamap: DataMap, subject: SubjectIdentifiers, account_ids: list[int]
) -> list[Mention]:
    """Rows outside the subject's own that still mention them: counted, never shown."""
    mentions = []
    for table_name, column_name, condition, params in _mention_conditions(datamap, subject):
        target = table_clause(datamap, table_name)
        query = (
            select(func.count())
            .select_from(target)
            .where(condition(target))
            .where(~primary_key_in(datamap, target, _reached_keys(datamap, table_name)))
        )
        rows = connection.execute(query, {**params, "account_ids": account_ids}).scalar_one()
        if rows:
            mentions.append(Mention(table_name, column_name, rows))
    return mentions


def _mention_conditions(
    datamap: DataMap, subject: SubjectIdentifiers
) -> Iterator[tuple[str, str, Any, dict[str, Any]]]:
    """(table, column, condition builder, parameters) for every column that can mention the subject: free text
    matching the very pattern the Great Expectations checks search for, and identifier columns holding a value."""
    pattern = text_pattern(subject)
    if pattern is not None:
        for table_name, column_name, _ in datamap.text_columns():
            yield (
                table_name,
                column_name,
                (lambda t, c=column_name: t.c[c].op("~*")(bindparam("pattern", type_=Text))),
                {"pattern": pattern},
            )
    for table_name, column_name, spec in datamap.identifier_columns():
        values = sorted(subject.by_kind(spec.kind))
        if not values:
            continue
        if spec.kind == Kind.ip:
            yield (
                table_name,
                column_name,
                (lambda t, c=column_name: func.host(t.c[c]) == any_(bindparam("values"))),
                {"values": values},
            )
        else:
            lowered = sorted({v.lower() for v in values})
            yield (
                table_name,
                column_name,
                (lambda t, c=column_name: func.lower(cast(t.c[c], Text)) == any_(bindparam("values"))),
                {"values": lowered},
            )


# --------------------------------------------------------------------------------------------------------------
# Erasure


@dataclass
class TableErasure:
    deleted: int = 0
    anonymised: int = 0
    retained: int = 0
    mentions_redacted: int = 0

    def total(self) -> int:
        return self.deleted + self.anonymised + self.retained + self.mentions_redacted


@dataclass
class Erasure:
    tables: dict[str, TableErasure] = field(default_factory=dict)

    def summary(self) -> dict[str, dict[str, int]]:
        return {name: vars(counts) for name, counts in self.tables.items() if counts.total()}


def erasure_order(datamap: DataMap) -> list[str]:
    """Tables in an order that never breaks a foreign key: a table before those it reaches through, the accounts
    table last (children first, so each reach's chain still exists when its rows are handled). Kahn's algorithm."""
    after: dict[str, set[str]] = {name: set() for name in datamap.postgres.tables}
    for name, spec in datamap.postgres.tables.items():
        after[name].update(r.through for r in spec.reaches if r.through is not None)
        if name != datamap.subject.table:
            after[name].add(datamap.subject.table)
    before: dict[str, set[str]] = {name: set() for name in after}
    for name, targets in after.items():
        for target in targets:
            before[target].add(name)
    ordered: list[str] = []
    ready = sorted(name for name, preceding in before.items() if not preceding)
    while ready:
        name = ready.pop(0)
        ordered.append(name)
        for target in sorted(after[name]):
            before[target].discard(name)
            if not before[target]:
                ready.append(target)
    return ordered


def erase_accounts(
    connection: Connection,
    datamap: DataMap,
    *,
    account_ids: list[int],
    subject: SubjectIdentifiers,
    secret_key: str,
    request_id: str,
    batch_size: int = BATCH_SIZE,
    redact_mentions: bool = True,
    identifiers: Mapping[int, dict[Kind, set[str]]] | None = None,
) -> Erasure:
    """Apply the map's erasure actions to every row of the accounts, then redact mentions elsewhere.

    `redact_mentions=False` skips the last pass (identifiers in rows that are not the accounts' own, searched in
    every free-text and identifier column of the whole database): bulk retention erases hundreds of accounts per
    call, and that pass scans every mapped table with a regex of all their identifiers. `identifiers` (per account)
    default to those the given map finds; a caller erasing only some categories passes those of the full map, so
    kept rows are still redacted of the person's email and name.
    """
    erasure = Erasure()
    # Each kept row is redacted with the identifiers of its own account: a pattern per account stays small and
    # compiles fast, where one pattern of a whole batch of accounts grows past what PostgreSQL can compile.
    by_account = (
        identifiers if identifiers is not None else identifiers_by_account(connection, datamap, account_ids)
    )
    params: dict[str, Any] = {
        "account_ids": account_ids,
        "pattern_accounts": account_ids,
        "patterns": [
            text_pattern(SubjectIdentifiers.from_kinds(by_account.get(a, {}))) or NEVER_MATCHES
            for a in account_ids
        ],
        "pattern": (text_pattern(subject) if redact_mentions else None) or NEVER_MATCHES,
        "hash_key": secret_key,
    }
    for table_name in erasure_order(datamap):
        counts = erasure.tables.setdefault(table_name, TableErasure())
        spec = datamap.table(table_name)
        # Deleting reaches go first: a row that is both deleted and anonymised is deleted.
        order = sorted(range(len(spec.reaches)), key=lambda i: spec.reaches[i].erasure != RowAction.delete_row)
        for index in order:
            reach = spec.reaches[index]
            if reach.erasure == RowAction.delete_row:
                counts.deleted += _delete_in_batches(connection, datamap, table_name, index, params, batch_size)
            else:
                if reach.erasure == RowAction.retain:
                    _record_retained(connection, datamap, table_name, index, reach, params, request_id)
                changed = _anonymise(connection, datamap, table_name, index, params)
                if reach.erasure == RowAction.retain:
                    counts.retained += changed
                else:
                    counts.anonymised += changed
    for table_name, column_name, condition, condition_params in (
        _mention_conditions(datamap, subject) if redact_mentions else ()
    ):
        target = table_clause(datamap, table_name)
        column_spec = datamap.table(table_name).columns[column_name]
        new_value: Any = (
            func.regexp_replace(target.c[column_name], bindparam("pattern", type_=Text), REDACTED, "gi")
            if column_spec.kind == Kind.free_text
            else None
        )
        result = connection.execute(
            update(target).where(condition(target)).values({column_name: new_value}),
            {**params, **condition_params},
        )
        erasure.tables.setdefault(table_name, TableErasure()).mentions_redacted += result.rowcount
    return erasure


def _pattern_of(identifiers: dict[Kind, set[str]]) -> str:
    return text_pattern(SubjectIdentifiers.from_kinds(identifiers)) or NEVER_MATCHES


def _delete_in_batches(
    connection: Connection, datamap: DataMap, table_name: str, index: int, params: dict[str, Any], batch_size: int
) -> int:
    target = table_clause(datamap, table_name)
    batch = reach_select(datamap, table_name, index).limit(batch_size)
    deleted = 0
    while True:
        rowcount = connection.execute(
            delete(target).where(primary_key_in(datamap, target, batch)), params
        ).rowcount
        deleted += rowcount
        if rowcount < batch_size:
            return deleted


def pseudonym_sql(account_id: ColumnElement[Any]) -> ColumnElement[str]:
    """The SQL twin of `privacy_ops.pii.pseudonym` (bind `hash_key`): identical pseudonyms, computed set-based."""
    material = func.concat_ws("|", bindparam("hash_key", type_=Text), PSEUDONYM_PURPOSE, cast(account_id, Text))
    digest = func.encode(func.sha256(func.convert_to(material, "UTF8")), "hex")
    return literal(PSEUDONYM_PREFIX) + func.left(digest, PSEUDONYM_LENGTH)


def _assignments(
    target: TableClause, columns: dict[str, Column], account_id: ColumnElement[Any], pattern: ColumnElement[str]
) -> dict[str, Any]:
    """SET clauses for the field actions of the columns of a row that is kept (`pattern`: its account's)."""
    values: dict[str, Any] = {}
    for name, spec in columns.items():
        if spec.erasure == FieldAction.set_null:
            values[name] = None
        elif spec.erasure == FieldAction.generic_replacement:
            values[name] = spec.replacement
        elif spec.erasure == FieldAction.redact_identifiers:
            values[name] = func.regexp_replace(target.c[name], pattern, REDACTED, "gi")
        elif spec.erasure == FieldAction.keyed_pseudonym:
            values[name] = pseudonym_sql(account_id)
    return values


def _anonymise(
    connection: Connection, datamap: DataMap, table_name: str, index: int, params: dict[str, Any]
) -> int:
    """One set-based UPDATE of the reached rows, joined to the account id each row reaches (for pseudonyms)."""
    spec = datamap.table(table_name)
    target = table_clause(datamap, table_name)
    batch = reach_select(datamap, table_name, index, with_account_id=True).subquery("batch")
    patterns = (
        func.unnest(
            bindparam("pattern_accounts", type_=ARRAY(BigInteger)), bindparam("patterns", type_=ARRAY(Text))
        )
        .table_valued("pattern_account_id", "pattern")
        .render_derived(name="patterns")
    )
    values = _assignments(target, spec.columns, batch.c.account_id, patterns.c.pattern)
    if not values:
        return 0
    statement = (
        update(target)
        .values(values)
        .where(*(target.c[k] == batch.c[k] for k in spec.primary_key))
        .where(batch.c.account_id == patterns.c.pattern_account_id)
    )
    return connection.execute(statement, params).rowcount


def _record_retained(
    connection: Connection,
    datamap: DataMap,
    table_name: str,
    index: int,
    reach: Reach,
    params: dict[str, Any],
    request_id: str,
) -> None:
    """Keep, in our own schema, which rows were retained for which pseudonym, and until when (their purge date)."""
    spec = datamap.table(table_name)
    assert spec.retention is not None  # the loader guarantees it for retaining reaches
    rows = reach_select(
        datamap, table_name, index, columns=[*spec.primary_key, spec.retention.clock_column], with_account_id=True
    ).subquery("batch")
    row_key = func.concat_ws(",", *(rows.c[k] for k in spec.primary_key))
    purge_after = rows.c[spec.retention.clock_column] + literal(timedelta(days=spec.retention.period_days))
    source = select(
        literal(request_id),
        pseudonym_sql(rows.c.account_id),
        literal(table_name),
        row_key,
        literal(spec.retention.legal_basis),
        cast(purge_after, Date),
    )
    statement = (
        insert(retained_records)
        .from_select(["request_id", "pseudonym", "table_name", "row_key", "legal_basis", "purge_after"], source)
        .on_conflict_do_nothing()
    )
    connection.execute(statement, params)


__all__ = [
    "Erasure",
    "Mention",
    "TableErasure",
    "TableExport",
    "account_ids_param",
    "collect_identifiers",
    "count_records",
    "erase_accounts",
    "erasure_order",
    "export_table",
    "find_accounts",
    "find_mentions",
    "subject_email",
]

"""Processing choices, by the data map's `processing` section: restriction (GDPR art. 18), objection (art. 21) and
the CCPA opt-out of sale/sharing (an objection to the `sale_or_sharing` purpose).

Every function takes a Connection and runs in the caller's transaction, and is idempotent: a rerun finds nothing
left to do and changes nothing. `leftovers` states, as SQL that must return no rows, what "done" means; the
Great Expectations suite in checks.py runs it after each request.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, insert, literal, or_, select, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection
from sqlalchemy.sql.expression import Select, TableClause

from privacy_ops.datamap.model import DataMap, Processing, Purpose
from privacy_ops.datamap.sql import ACCOUNT_IDS, primary_key_in, reach_select, table_clause


class UnknownPurpose(ValueError):
    """A purpose the data map does not list (the message names the purpose and the known ones)."""


@dataclass(frozen=True)
class Change:
    """Rows changed per table and action, e.g. {"analytics_profiles": {"deleted": 1}}; no personal data."""

    counts: dict[str, dict[str, int]]

    def total(self) -> int:
        return sum(n for actions in self.counts.values() for n in actions.values())


def processing_of(datamap: DataMap) -> Processing:
    if datamap.processing is None:
        raise ValueError("the data map has no processing section: restriction and objection are not configured")
    return datamap.processing


def purposes_named(datamap: DataMap, names: Sequence[str]) -> dict[str, Purpose]:
    """The named purposes, in the map's order; UnknownPurpose for a name the map does not list."""
    purposes = processing_of(datamap).purposes
    unknown = sorted(set(names) - set(purposes))
    if unknown or not names:
        raise UnknownPurpose(
            f"unknown purpose(s) {', '.join(unknown) or '(none given)'}: the data map lists {', '.join(purposes)}"
        )
    return {name: purpose for name, purpose in purposes.items() if name in names}


def restrictable(datamap: DataMap) -> dict[str, Purpose]:
    return {name: p for name, p in processing_of(datamap).purposes.items() if p.restrictable}


def restrict(connection: Connection, datamap: DataMap, account_ids: list[int], now: datetime) -> Change:
    """Mark the accounts restricted and take them out of every restrictable purpose's outputs (data is kept)."""
    counts: dict[str, dict[str, int]] = {}
    subject = _subject(datamap)
    marker = subject.c[processing_of(datamap).restriction_column]
    marked = connection.execute(
        update(subject).where(_subject_in(datamap, subject, account_ids), marker.is_(None)).values({marker: now})
    ).rowcount
    counts[datamap.subject.table] = {"restricted": marked}
    for table_name in _tables(restrictable(datamap), "outputs"):
        counts.setdefault(table_name, {})["deleted"] = _delete_reaching(
            connection, datamap, table_name, account_ids
        )
    return Change(counts)


def lift_restriction(connection: Connection, datamap: DataMap, account_ids: list[int]) -> Change:
    """Clear the restriction marker: CellCMS's jobs include the accounts in their outputs again."""
    subject = _subject(datamap)
    marker = subject.c[processing_of(datamap).restriction_column]
    lifted = connection.execute(
        update(subject)
        .where(_subject_in(datamap, subject, account_ids), marker.is_not(None))
        .values({marker: None})
    ).rowcount
    return Change({datamap.subject.table: {"lifted": lifted}})


def object_to(
    connection: Connection,
    datamap: DataMap,
    account_ids: list[int],
    purposes: dict[str, Purpose],
    *,
    source: str,
    now: datetime,
) -> Change:
    """Record the objections, delete what was collected for those purposes only, take the accounts out of their
    outputs, switch their processing off and withdraw the matching cookie consent."""
    processing = processing_of(datamap)
    objections = table_clause(datamap, processing.objections_table)
    counts: dict[str, dict[str, int]] = {}
    recorded = 0
    for name in purposes:
        already = select(objections.c.account_id).where(
            objections.c.account_id.in_(account_ids), objections.c.purpose == name
        )
        new_ids = sorted(set(account_ids) - set(connection.execute(already).scalars()))
        if new_ids:
            connection.execute(
                insert(objections),
                [{"account_id": a, "purpose": name, "source": source, "objected_at": now} for a in new_ids],
            )
        recorded += len(new_ids)
    counts[processing.objections_table] = {"recorded": recorded}
    for table_name in _tables(purposes, "collected", "outputs"):
        counts.setdefault(table_name, {})["deleted"] = _delete_reaching(
            connection, datamap, table_name, account_ids
        )
    for reference in _switches(purposes):
        table_name, column_name = reference.split(".")
        target = table_clause(datamap, table_name)
        switched = 0
        for rows in _reaching(datamap, table_name):
            switched += connection.execute(
                update(target)
                .where(primary_key_in(datamap, target, rows), target.c[column_name].is_(True))
                .values({column_name: False}),
                {ACCOUNT_IDS: account_ids},
            ).rowcount
        counts.setdefault(table_name, {})[f"{column_name}_off"] = switched
    for purpose in purposes.values():
        if purpose.consent is None:
            continue
        consent = purpose.consent
        target = table_clause(datamap, consent.table)
        granted, category = target.c[consent.granted_column], target.c[consent.category_column]
        withdrawn = 0
        for rows in _reaching(datamap, consent.table):
            withdrawn += connection.execute(
                update(target)
                .where(primary_key_in(datamap, target, rows), category == consent.category, granted.is_(True))
                .values({consent.granted_column: False}),
                {ACCOUNT_IDS: account_ids},
            ).rowcount
        counts.setdefault(consent.table, {})["consent_withdrawn"] = withdrawn
    return Change(counts)


def service_terms(connection: Connection, datamap: DataMap, account_ids: list[int]) -> dict[str, dict[str, Any]]:
    """The account's plan and other service terms (the map's `service_terms_columns`), per account id."""
    names = datamap.subject.service_terms_columns
    if not names:
        return {}
    subject = _subject(datamap)
    rows = connection.execute(
        select(subject.c[datamap.subject.id_column], *(subject.c[n] for n in names)).where(
            _subject_in(datamap, subject, account_ids)
        )
    )
    return {str(row[0]): {name: row[i + 1] for i, name in enumerate(names)} for row in rows}


def leftovers(
    datamap: DataMap, account_ids: list[int], *, restricted: bool = False, objected: Sequence[str] = ()
) -> dict[str, str]:
    """SQL per check name that must return no rows once restriction / the objections are carried out."""
    queries: dict[str, Select[Any]] = {}
    if restricted:
        subject = _subject(datamap)
        marker = subject.c[processing_of(datamap).restriction_column]
        queries["not_marked_restricted"] = select(literal(1)).where(
            _subject_in(datamap, subject, account_ids), marker.is_(None)
        )
        for table_name in _tables(restrictable(datamap), "outputs"):
            queries[f"restricted_in.{table_name}"] = _union(datamap, table_name)
    purposes = purposes_named(datamap, objected) if objected else {}
    for table_name in _tables(purposes, "collected", "outputs"):
        queries[f"objected_in.{table_name}"] = _union(datamap, table_name)
    for reference in _switches(purposes):
        table_name, column_name = reference.split(".")
        target = table_clause(datamap, table_name)
        for index, rows in enumerate(_reaching(datamap, table_name)):
            queries[f"switch_on.{reference}.{index}"] = select(literal(1)).where(
                primary_key_in(datamap, target, rows), target.c[column_name].is_(True)
            )
    for name, purpose in purposes.items():
        if purpose.consent is not None:
            consent = purpose.consent
            target = table_clause(datamap, consent.table)
            for index, rows in enumerate(_reaching(datamap, consent.table)):
                queries[f"consent_granted.{name}.{index}"] = select(literal(1)).where(
                    primary_key_in(datamap, target, rows),
                    target.c[consent.category_column] == consent.category,
                    target.c[consent.granted_column].is_(True),
                )
    return {name: _literal_sql(query, account_ids) for name, query in queries.items()}


# ---------------------------------------------------------------------------------------------------- helpers
def _subject(datamap: DataMap) -> TableClause:
    return table_clause(datamap, datamap.subject.table)


def _subject_in(datamap: DataMap, subject: TableClause, account_ids: list[int]) -> Any:
    return subject.c[datamap.subject.id_column].in_(account_ids)


def _tables(purposes: dict[str, Purpose], *kinds: str) -> list[str]:
    """The distinct tables the purposes list under `kinds` (collected, outputs), in order."""
    return list(dict.fromkeys(t for p in purposes.values() for kind in kinds for t in getattr(p, kind)))


def _switches(purposes: dict[str, Purpose]) -> list[str]:
    return list(dict.fromkeys(s for p in purposes.values() for s in p.switches))


def _reaching(datamap: DataMap, table_name: str) -> list[Select[Any]]:
    return [reach_select(datamap, table_name, i) for i in range(len(datamap.table(table_name).reaches))]


def _delete_reaching(connection: Connection, datamap: DataMap, table_name: str, account_ids: list[int]) -> int:
    target = table_clause(datamap, table_name)
    return sum(
        connection.execute(
            delete(target).where(primary_key_in(datamap, target, rows)), {ACCOUNT_IDS: account_ids}
        ).rowcount
        for rows in _reaching(datamap, table_name)
    )


def _union(datamap: DataMap, table_name: str) -> Select[Any]:
    """Any row of the table reaching the accounts, along any reach."""
    target = table_clause(datamap, table_name)
    reaching = or_(*(primary_key_in(datamap, target, rows) for rows in _reaching(datamap, table_name)))
    return select(literal(1)).select_from(target).where(reaching)


def _literal_sql(query: Select[Any], account_ids: list[int]) -> str:
    """The query with the account ids inlined (ids, no personal data): a Great Expectations query asset."""
    bound = query.params({ACCOUNT_IDS: [int(a) for a in account_ids]})
    return str(bound.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}))

"""What the portability (GDPR art. 20) and right-to-know (CCPA) packages hold, decided by the data map alone.

- **Portability** carries the data the person *provided*: the map's `portable: true` tables, each as
  `<table>.json` + `<table>.csv`, and each asset's current file as-is under `files/<S3 key>`, described by a
  versioned manifest (tables with columns, keys and references, row counts, files with SHA-256) that another CMS
  can import from. Left out: observed data (tables that are not portable, and columns of the policy's
  automatically collected categories, e.g. `accounts.last_active_at`, `asset_versions.uploader_ip`), secrets
  (`exported: false`), and rows another account provided (a row whose account column names someone else, e.g. a
  collaborator's document in the person's project: art. 20 covers what the person provided, and 20(4) protects
  the others).
- **Right to know** discloses the categories of personal information held about the person, with the map's
  `disclosures:` (description, sources, purposes, shared with) and counts, and the specific pieces: the access
  package's content restricted to what was collected in the 12 months before the request (a table's
  `collected_at` column; tables without one are included whole).

Prefect-free: tasks/portability.py streams rows from `stores.postgres.export_table` through the views here.
"""

from __future__ import annotations

import calendar
import re
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.engine import Connection

from privacy_ops.datamap.model import Category, DataMap, Kind, Table
from privacy_ops.datamap.sql import table_clause
from privacy_ops.export import CATEGORY_LABELS, ManifestEntry
from privacy_ops.stores.postgres import OTHER_ACCOUNT, TableExport

if TYPE_CHECKING:
    import pandas as pd

# The policy's section 1 "Information Collected Automatically": observed, not provided, data.
OBSERVED_CATEGORIES = frozenset({Category.usage, Category.device, Category.logs})
PORTABILITY_FORMAT = "cellcms-portability"
PORTABILITY_FORMAT_VERSION = 1
FILES_DIRECTORY = "files"
KNOW_WINDOW_MONTHS = 12  # CCPA §1798.130(a)(2)(B): the 12 months before the request
CATEGORIES_JSON = "categories.json"
CATEGORIES_MD = "categories.md"

# An email address inside any text (the domain ends on a letter, so "x@y.example:" yields "x@y.example").
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")


# ---------------------------------------------------------------------------------------------------- table views
def portable_tables(datamap: DataMap) -> list[str]:
    """The tables of data the person provided, in the map's order."""
    return [name for name, spec in datamap.postgres.tables.items() if spec.portable]


def column_category(spec: Table, column: str) -> Category:
    """A column's category: its own when the map gives one, else its table's."""
    mapped = spec.columns.get(column)
    return mapped.category if mapped is not None and mapped.category is not None else spec.category


def account_columns(datamap: DataMap, table_name: str) -> set[str]:
    """Columns holding an account id: reach columns without `through` and `account_ref` columns."""
    spec = datamap.table(table_name)
    direct = {r.column for r in spec.reaches if r.through is None}
    return direct | {name for name, column in spec.columns.items() if column.kind == Kind.account_ref}


def _is_provided_column(spec: Table, name: str) -> bool:
    mapped = spec.columns.get(name)
    if mapped is not None and not mapped.exported:
        return False  # secrets: the access package says they exist; a portable copy has no use for them
    return column_category(spec, name) not in OBSERVED_CATEGORIES


def provided_view(datamap: DataMap, export: TableExport) -> TableExport:
    """Only what the person provided: no secret or observed columns, no rows another account provided.

    Another account shows as `OTHER_ACCOUNT` in an exported account column (stores.postgres masks it), so a row
    with such a value (a collaborator's document or membership in the person's project) is left out.
    """
    spec = datamap.table(export.table)
    keep = [i for i, name in enumerate(export.columns) if _is_provided_column(spec, name)]
    owners = [i for i, name in enumerate(export.columns) if name in account_columns(datamap, export.table)]
    rows = (tuple(row[i] for i in keep) for row in export.rows if not any(row[i] == OTHER_ACCOUNT for i in owners))
    return TableExport(export.table, export.category, [export.columns[i] for i in keep], rows)


def months_before(moment: datetime, months: int = KNOW_WINDOW_MONTHS) -> datetime:
    """The same time `months` calendar months earlier (the 31st becomes the month's last day)."""
    year, month_index = divmod(moment.year * 12 + moment.month - 1 - months, 12)
    day = min(moment.day, calendar.monthrange(year, month_index + 1)[1])
    return moment.replace(year=year, month=month_index + 1, day=day)


def collected_since(value: Any, since: datetime) -> bool:
    """Whether a `collected_at` value is on or after `since`; unknown (null) counts as collected: it is shown."""
    if value is None:
        return True
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)) >= since
    if isinstance(value, date):
        return value >= since.astimezone(UTC).date()
    if isinstance(value, str):
        return collected_since(_parse_moment(value), since)
    raise TypeError(f"cannot compare a collected_at value of type {type(value).__name__}")


def _parse_moment(text: str) -> datetime | date | None:
    try:
        return date.fromisoformat(text) if len(text) == 10 else datetime.fromisoformat(text)
    except ValueError:
        return None


def window_view(datamap: DataMap, export: TableExport, since: datetime) -> TableExport:
    """Only the rows collected on or after `since` (by the table's `collected_at`; without one, every row)."""
    column = datamap.table(export.table).collected_at
    if column is None:
        return export
    index = export.columns.index(column)
    return TableExport(
        export.table,
        export.category,
        export.columns,
        (row for row in export.rows if collected_since(row[index], since)),
    )


@dataclass
class CategoryTally:
    """Records, per policy category, what a package holds: rows per table, and categories that only some columns
    carry (a table's rows count for its category; a column of another category counts when it holds a value)."""

    records: dict[str, dict[str, int]] = field(default_factory=dict)  # category -> {table or store: count}

    def add(self, category: str, source: str, count: int) -> None:
        if count:
            by_source = self.records.setdefault(category, {})
            by_source[source] = by_source.get(source, 0) + count

    def view(self, datamap: DataMap, export: TableExport) -> TableExport:
        """Pass rows through, counting them for the table's category and its other-category columns' values."""
        spec = datamap.table(export.table)
        others = [
            (i, column_category(spec, name).value)
            for i, name in enumerate(export.columns)
            if column_category(spec, name) != spec.category
        ]

        def counted(rows: Iterable[tuple[Any, ...]]) -> Iterator[tuple[Any, ...]]:
            for row in rows:
                self.add(spec.category.value, export.table, 1)
                for index, category in others:
                    if row[index] is not None:
                        self.add(category, f"{export.table}.{export.columns[index]}", 1)
                yield row

        return TableExport(export.table, export.category, export.columns, counted(export.rows))


# ---------------------------------------------------------------------------------------------------- know
def disclosed_categories(datamap: DataMap, tally: CategoryTally) -> list[dict[str, Any]]:
    """For each category of the policy the person has data in (policy order): the map's disclosure and counts.

    A category without a disclosure in the map is listed with empty fields: the package check fails on it.
    """
    order = list(CATEGORY_LABELS)
    held = sorted(
        (c for c in tally.records if c in {m.value for m in Category}),
        key=lambda c: order.index(c) if c in order else len(order),
    )
    listed = []
    for name in held:
        disclosure = datamap.disclosures.get(Category(name))
        listed.append(
            {
                "category": name,
                "name": CATEGORY_LABELS.get(name, name),
                "description": disclosure.description if disclosure else "",
                "sources": list(disclosure.sources) if disclosure else [],
                "purposes": list(disclosure.purposes) if disclosure else [],
                "shared_with": list(disclosure.shared_with) if disclosure else [],
                "records": dict(sorted(tally.records[name].items())),
            }
        )
    return listed


def categories_markdown(categories: Sequence[Mapping[str, Any]], since: datetime, until: datetime) -> str:
    """The categories disclosure for people: one section per category."""
    lines = [
        "# Personal information CellCMS collected about you",
        "",
        f"Period: {since:%Y-%m-%d} to {until:%Y-%m-%d} (the 12 months before your request).",
        "The specific pieces are in the folders of this package, one per category; "
        "`categories.json` has this overview in machine-readable form.",
    ]
    for category in categories:
        lines += ["", f"## {category['name']}", "", str(category["description"]), ""]
        lines.append("- Sources: " + ("; ".join(category["sources"]) or "-"))
        lines.append("- Purposes: " + ("; ".join(category["purposes"]) or "-"))
        lines.append("- Shared with: " + ("; ".join(category["shared_with"]) or "nobody"))
        records = ", ".join(f"{source}: {count}" for source, count in category["records"].items())
        lines.append(f"- Records: {records}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- portability
@dataclass(frozen=True)
class PortableTable:
    """A table as the portability manifest describes it (what an importer needs besides the rows)."""

    table: str
    category: str
    columns: list[str]
    primary_key: list[str]
    references: dict[str, str]  # column -> "table.column" it refers to


def portable_table(datamap: DataMap, table_name: str, columns: list[str]) -> PortableTable:
    """Keys and references from the map: `through` reaches refer to another table's key, direct ones to the
    account."""
    spec = datamap.table(table_name)
    subject = datamap.subject
    references = {}
    for reach in spec.reaches:
        if reach.through is not None:
            target = f"{reach.through}.{datamap.table(reach.through).primary_key[0]}"
        else:
            target = f"{subject.table}.{subject.id_column}"
        if reach.column in columns and not (table_name == subject.table and reach.column == subject.id_column):
            references[reach.column] = target
    for name, column in spec.columns.items():
        if column.kind == Kind.account_ref and name in columns:
            references.setdefault(name, f"{subject.table}.{subject.id_column}")
    return PortableTable(table_name, spec.category.value, columns, list(spec.primary_key), references)


def portability_manifest(
    request_id: str, generated_at: datetime, tables: Sequence[PortableTable], entries: Sequence[ManifestEntry]
) -> dict[str, Any]:
    """The package's manifest.json: format and version, every table (columns, key, references, rows, files and
    their SHA-256) and every file (path, original S3 key, size, SHA-256)."""
    by_table = {entry.table: entry for entry in entries if entry.kind == "table"}
    described_tables = []
    for table in tables:
        entry = by_table[table.table]
        described_tables.append(
            {
                "table": table.table,
                "category": table.category,
                "rows": entry.rows,
                "columns": table.columns,
                "primary_key": table.primary_key,
                "references": table.references,
                "files": [
                    {"path": path, "format": path.rpartition(".")[2], "sha256": digest}
                    for path, digest in zip(entry.paths, entry.sha256, strict=True)
                ],
            }
        )
    files = [
        {
            "path": entry.paths[0],
            "s3_key": entry.paths[0].removeprefix(FILES_DIRECTORY + "/"),
            "size_bytes": entry.size_bytes,
            "sha256": entry.sha256[0],
        }
        for entry in entries
        if entry.kind == "file"
    ]
    return {
        "format": PORTABILITY_FORMAT,
        "format_version": PORTABILITY_FORMAT_VERSION,
        "request_id": request_id,
        "generated_at": generated_at.astimezone(UTC).isoformat(),
        "encoding": {
            "json": "UTF-8; an array of objects, one per row, keyed by column; timestamps ISO 8601",
            "csv": "UTF-8, RFC 4180, header row; a text cell starting with = + - @ is prefixed with ' "
            "(spreadsheet safety): the JSON holds the exact values",
            "files": f"{FILES_DIRECTORY}/<S3 key>: each asset's current version, byte for byte "
            "(assets.s3_key names it; asset_versions lists the earlier versions)",
        },
        "tables": described_tables,
        "files": files,
    }


# ---------------------------------------------------------------------------------------------------- reading back
@dataclass(frozen=True)
class PackageView:
    """A package read back for its checks: the rows of each table it holds, as exported."""

    tables: dict[str, list[dict[str, Any]]]  # table -> rows
    categories: list[dict[str, Any]] | None  # categories.json's list, when the package has one


def read_package(archive: zipfile.ZipFile, table_paths: Mapping[str, str]) -> PackageView:
    """The tables at `table_paths` (table -> JSON path) present in the archive, and categories.json if any."""
    import json

    names = set(archive.namelist())
    tables = {table: json.loads(archive.read(path)) for table, path in table_paths.items() if path in names}
    categories = json.loads(archive.read(CATEGORIES_JSON))["categories"] if CATEGORIES_JSON in names else None
    return PackageView(tables, categories)


def manifest_frame(datamap: DataMap, view: PackageView) -> pd.DataFrame:
    """(table, category, account_id, rows) per table and owning account, for `checks.access_package_checks`.
    Tables reached only through another table (or by several reaches) have no single owner column: null."""
    import pandas as pd

    rows: list[dict[str, Any]] = []
    for table_name, table_rows in view.tables.items():
        spec = datamap.table(table_name)
        direct = [r.column for r in spec.reaches if r.through is None]
        owner = direct[0] if len(direct) == len(spec.reaches) else None
        counts: dict[int | None, int] = {}
        for row in table_rows:
            key = _account_id(row.get(owner)) if owner else None
            counts[key] = counts.get(key, 0) + 1
        rows += [
            {"table": table_name, "category": spec.category.value, "account_id": account_id, "rows": n}
            for account_id, n in counts.items()
        ]
    return pd.DataFrame(rows, columns=["table", "category", "account_id", "rows"])


def _account_id(value: Any) -> int:
    """An exported account id; another account's (masked) counts as -1, never one of the person's."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1


def subject_frame(datamap: DataMap, view: PackageView) -> pd.DataFrame:
    """(account_id, email) of the subject table's rows in the package, emails lower-cased."""
    import pandas as pd

    subject = datamap.subject
    rows = [
        {
            "account_id": _account_id(row.get(subject.id_column)),
            "email": str(row.get(subject.email_column) or "").lower() or None,
        }
        for row in view.tables.get(subject.table, [])
    ]
    return pd.DataFrame(rows, columns=["account_id", "email"])


def emails_in(view: PackageView) -> dict[tuple[str, str], set[str]]:
    """Every email address in any value of any table, lower-cased, by (table, column); JSON values searched too."""
    found: dict[tuple[str, str], set[str]] = {}
    for table, rows in view.tables.items():
        for row in rows:
            for column, value in row.items():
                for text in _strings(value):
                    for match in _EMAIL.findall(text):
                        found.setdefault((table, column), set()).add(match.lower())
    return found


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def account_emails(connection: Connection, datamap: DataMap, emails: Iterable[str]) -> dict[str, int]:
    """Which of these (lower-cased) addresses are an account's email on file, and whose: email -> account id."""
    wanted = sorted(set(emails))
    if not wanted:
        return {}
    subject = datamap.subject
    accounts = table_clause(datamap, subject.table)
    email = func.lower(accounts.c[subject.email_column])
    query = select(email, accounts.c[subject.id_column]).where(email.in_(wanted))
    return {str(address): int(account) for address, account in connection.execute(query)}


def email_owner_frame(
    found: Mapping[tuple[str, str], set[str]], owners: Mapping[str, int], account_ids: set[int]
) -> pd.DataFrame:
    """(table, column, owner) per address found: "subject", "other_account" (another account's email on file) or
    "unknown" (no account's, e.g. a company's billing address). No address leaves this frame."""
    import pandas as pd

    def owner(address: str) -> str:
        if address not in owners:
            return "unknown"
        return "subject" if owners[address] in account_ids else "other_account"

    rows = [
        {"table": table, "column": column, "owner": owner(address)}
        for (table, column), addresses in sorted(found.items())
        for address in sorted(addresses)
    ]
    return pd.DataFrame(rows, columns=["table", "column", "owner"])


def window_frame(datamap: DataMap, view: PackageView, since: datetime) -> pd.DataFrame:
    """(table, rows_before_window) per table with a `collected_at` column: rows collected before `since`."""
    import pandas as pd

    rows = []
    for table_name, table_rows in view.tables.items():
        column = datamap.table(table_name).collected_at
        if column is None:
            continue
        older = sum(1 for row in table_rows if not collected_since(row.get(column), since))
        rows.append({"table": table_name, "rows_before_window": older})
    return pd.DataFrame(rows, columns=["table", "rows_before_window"])


def categories_frame(datamap: DataMap, view: PackageView) -> pd.DataFrame:
    """(category, listed, described) per category whose tables hold rows in the package: listed in
    categories.json, and described there (description, sources and purposes all given)."""
    import pandas as pd

    listed = {str(c["category"]): c for c in view.categories or []}
    held = sorted({datamap.table(t).category.value for t, rows in view.tables.items() if rows} | set(listed))
    rows = [
        {
            "category": name,
            "listed": name in listed,
            "described": bool(
                name in listed
                and listed[name].get("description")
                and listed[name].get("sources")
                and listed[name].get("purposes")
            ),
        }
        for name in held
    ]
    return pd.DataFrame(rows, columns=["category", "listed", "described"])

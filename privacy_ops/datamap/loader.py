"""Load the data map with file/line positions, and check it against the live CellCMS database.

`load_datamap` parses the YAML keeping every node's line, validates it with the pydantic models of `model.py`, then
runs the checks pydantic cannot (tables that `through` names, chains that end at an account column, the subject's
columns, retention clocks, Stripe and S3 references). `check_against_database` compares the map with the schema of
a running PostgreSQL. Both report every problem at once, one `file:line: location: message` line each, by raising
`DataMapError`; tables and columns the map does not mention are returned as warnings.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar, Union

import yaml
from pydantic import BaseModel, ValidationError
from sqlalchemy import inspect
from sqlalchemy.engine import Connection, Engine, Inspector

from privacy_ops.datamap.model import (
    ACCOUNT_ACTIONS,
    ROW_ACTIONS,
    Anonymiser,
    DataMap,
    Kind,
    Reach,
    RetentionAction,
    RetentionRule,
    S3Location,
    StripeCustomer,
    Subject,
    Table,
)
from privacy_ops.settings import Settings

# A position in the YAML document: mapping keys as str, sequence indexes as int.
YamlPath = tuple[str | int, ...]

# Tables of the CellCMS schema that never hold personal data and need no entry in the map.
NOT_PERSONAL_TABLES = frozenset({"alembic_version"})

# libyaml's loader when PyYAML was built with it (~15x faster); both give the same nodes and marks.
_YamlLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the data map, located in its file."""

    file: str
    line: int
    location: str  # e.g. "documents.author_email" or "postgres.tables.documents.reaches[1].through"
    message: str

    def __str__(self) -> str:
        where = f"{self.location}: " if self.location else ""
        return f"{self.file}:{self.line}: {where}{self.message}"


class DataMapError(Exception):
    """The data map is invalid; `problems` lists everything found, `str()` gives one line per problem."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = sorted(problems, key=lambda p: (p.file, p.line))
        super().__init__("\n".join(str(p) for p in self.problems))


# ---------------------------------------------------------------------------------------------------------------
# Reading the YAML with positions


@dataclass
class _Source:
    """The parsed YAML: the plain data, the 1-based line of every path, and problems found while reading."""

    file: str
    data: Any = None
    lines: dict[YamlPath, int] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    def line(self, path: YamlPath) -> int:
        """The line of `path`, or of its nearest ancestor present in the file (a missing key, a default)."""
        for end in range(len(path), 0, -1):
            if path[:end] in self.lines:
                return self.lines[path[:end]]
        return 1

    def problem(self, path: YamlPath, message: str, location: str | None = None) -> Problem:
        return Problem(self.file, self.line(path), _dotted(path) if location is None else location, message)


def _display_name(path: Path) -> str:
    """The path relative to the working directory when it lies below it, as it was given otherwise."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _dotted(path: YamlPath) -> str:
    """The path as text: postgres.tables.documents.reaches[1].through."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else part
    return text


def _read(path: Path) -> _Source:
    """Parse one YAML document, recording the line of every mapping key and sequence item."""
    source = _Source(_display_name(path))
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        source.problems.append(Problem(source.file, 1, "", f"cannot read the data map: {error.strerror or error}"))
        return source
    loader = _YamlLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            source.problems.append(Problem(source.file, 1, "", "the data map is empty"))
            return source
        _record_lines(node, (), source, set())
        source.data = loader.construct_document(node)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = mark.line + 1 if mark is not None else 1
        detail = error.problem or error.context or "invalid YAML"
        if error.context and error.problem:
            started = error.context_mark
            where = (
                f" started on line {started.line + 1}" if started is not None and started.line + 1 != line else ""
            )
            detail = f"{error.problem} ({error.context}{where})"
        source.problems.append(Problem(source.file, line, "", f"YAML syntax error: {detail}"))
    except yaml.YAMLError as error:
        source.problems.append(Problem(source.file, 1, "", f"YAML syntax error: {error}"))
    finally:
        loader.dispose()
    return source


def _record_lines(node: yaml.Node, path: YamlPath, source: _Source, active: set[int]) -> None:
    """Walk the node tree: line of each key (mapping) or item (sequence); duplicate keys are problems."""
    if id(node) in active:  # a recursive alias; construct_document reports nothing useful, nor do we need to
        return
    active.add(id(node))
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.value == "<<":
                continue  # complex keys and merge keys: errors land on the enclosing mapping's line
            child = (*path, key_node.value)
            if child in source.lines:
                source.problems.append(
                    Problem(
                        source.file,
                        key_node.start_mark.line + 1,
                        _dotted(child),
                        f"duplicate key (also on line {source.lines[child]}); YAML keeps only the last one",
                    )
                )
                continue
            source.lines[child] = key_node.start_mark.line + 1
            _record_lines(value_node, child, source, active)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            source.lines[(*path, index)] = item.start_mark.line + 1
            _record_lines(item, (*path, index), source, active)
    active.discard(id(node))


# ---------------------------------------------------------------------------------------------------------------
# Pydantic errors as problems


def _unwrap(annotation: Any) -> Any:
    """Strip Annotated[...] and `X | None` down to X."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            members = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(members) != 1:
                return annotation
            annotation = members[0]
        else:
            return annotation


def _annotation_at(loc: Sequence[str | int]) -> Any:
    """The type the model expects at `loc` (a pydantic error location), or None when it cannot tell."""
    annotation: Any = DataMap
    for part in loc:
        annotation = _unwrap(annotation)
        origin = typing.get_origin(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            fields = {(info.alias or name): info for name, info in annotation.model_fields.items()}
            if part not in fields:
                return None
            annotation = fields[str(part)].annotation
        elif origin is dict:
            annotation = typing.get_args(annotation)[1]
        elif origin is list:
            annotation = typing.get_args(annotation)[0]
        else:
            return None
    return _unwrap(annotation)


def _model_keys(annotation: Any) -> list[str]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [info.alias or name for name, info in annotation.model_fields.items()]
    return []


def _validation_problems(error: ValidationError, source: _Source, prefix: YamlPath = ()) -> list[Problem]:
    """One problem per pydantic error, with readable messages for unknown values, keys and missing keys."""
    problems = []
    for item in error.errors():
        loc: YamlPath = (*prefix, *(p for p in item["loc"] if p != "[key]"))
        kind, message = item["type"], item["msg"]
        expected = _annotation_at(loc)
        if kind == "enum" and isinstance(expected, type) and issubclass(expected, Enum):
            allowed = ", ".join(str(member.value) for member in expected)
            message = f"unknown value {item['input']!r}; allowed: {allowed}"
        elif kind == "missing":
            problems.append(source.problem(loc, f"missing required key '{loc[-1]}'", _dotted(loc[:-1]) or "(top)"))
            continue
        elif kind == "extra_forbidden":
            allowed = ", ".join(_model_keys(_annotation_at(loc[:-1])))
            message = f"unknown key '{loc[-1]}'" + (f"; allowed: {allowed}" if allowed else "")
        elif kind in ("value_error", "assertion_error"):
            message = message.removeprefix("Value error, ").removeprefix("Assertion failed, ")
        problems.append(source.problem(loc, message, _dotted(loc) or "(top)"))
    return problems


# ---------------------------------------------------------------------------------------------------------------
# Checks pydantic cannot do


@dataclass
class _Parts:
    """The parts of the map that validate on their own: checked even when another part is broken."""

    subject: Subject | None = None
    tables: dict[str, Table | None] = field(default_factory=dict)  # None: present, but invalid
    s3: dict[str, S3Location | None] = field(default_factory=dict)
    stripe: StripeCustomer | None = None
    retention: dict[str, RetentionRule | None] = field(default_factory=dict)

    @classmethod
    def of(cls, datamap: DataMap) -> _Parts:
        rules: dict[str, RetentionRule | None] = dict(datamap.retention.rules) if datamap.retention else {}
        return cls(datamap.subject, dict(datamap.postgres.tables), dict(datamap.s3), datamap.stripe, rules)

    @classmethod
    def salvage(cls, data: Any) -> _Parts:
        """Validate each part of a map that failed as a whole; invalid parts become None (errors already known)."""
        parts = cls()
        if not isinstance(data, Mapping):
            return parts
        parts.subject = _try(Subject, data.get("subject"))
        postgres = data.get("postgres")
        tables = postgres.get("tables") if isinstance(postgres, Mapping) else None
        if isinstance(tables, Mapping):
            parts.tables = {str(name): _try(Table, spec) for name, spec in tables.items()}
        s3 = data.get("s3")
        if isinstance(s3, Mapping):
            parts.s3 = {str(name): _try(S3Location, spec) for name, spec in s3.items()}
        parts.stripe = _try(StripeCustomer, data.get("stripe"))
        retention = data.get("retention")
        rules = retention.get("rules") if isinstance(retention, Mapping) else None
        if isinstance(rules, Mapping):
            parts.retention = {str(name): _try(RetentionRule, spec) for name, spec in rules.items()}
        return parts


_M = TypeVar("_M", bound=BaseModel)


def _try(model: type[_M], data: Any) -> _M | None:
    try:
        return model.model_validate(data)
    except ValidationError:
        return None


def known_columns(table: Table) -> list[str]:
    """Every column the map names for a table: primary key, reach columns, then `columns` (no duplicates)."""
    names = [*table.primary_key, *(r.column for r in table.reaches), *table.columns]
    return list(dict.fromkeys(names))


def _table_path(name: str) -> YamlPath:
    return ("postgres", "tables", name)


def _semantic_problems(parts: _Parts, source: _Source) -> list[Problem]:
    problems: list[Problem] = []

    def add(path: YamlPath, message: str) -> None:
        problems.append(source.problem(path, message))

    def not_a_table(name: str) -> str:
        return f"'{name}' is not a table of the data map (postgres.tables)"

    if parts.subject is not None:
        subject = parts.subject
        table = parts.tables.get(subject.table)
        if subject.table not in parts.tables:
            add(("subject", "table"), not_a_table(subject.table))
        elif table is not None:
            for key, column in (("id_column", subject.id_column), ("email_column", subject.email_column)):
                if column not in table.columns and column not in table.primary_key:
                    add(("subject", key), f"'{column}' is not in columns or primary_key of {subject.table}")
            spec = table.columns.get(subject.email_column)
            if spec is not None and spec.kind != "email":
                add(("subject", "email_column"), f"'{subject.email_column}' has kind {spec.kind}, not email")

    for name, table in parts.tables.items():
        if table is None:
            continue
        path = _table_path(name)
        seen: dict[str, int] = {}
        for index, reach in enumerate(table.reaches):
            reach_path = (*path, "reaches", index)
            if reach.column in seen:
                add((*reach_path, "column"), f"reaches[{seen[reach.column]}] already uses column '{reach.column}'")
            seen.setdefault(reach.column, index)
            if reach.through is not None:
                problems.extend(_through_problems(name, reach, (*reach_path, "through"), parts.tables, source))
        if table.retention is not None and table.retention.clock_column not in known_columns(table):
            add(
                (*path, "retention", "clock_column"),
                f"'{table.retention.clock_column}' is not a column of {name} (columns, primary_key or reaches)",
            )

    if parts.stripe is not None:
        stripe = parts.stripe
        stripe_table = parts.tables.get(stripe.customer_id_table)
        if stripe.customer_id_table not in parts.tables:
            add(("stripe", "customer_id_table"), not_a_table(stripe.customer_id_table))
        elif stripe_table is not None and stripe.customer_id_column not in known_columns(stripe_table):
            add(
                ("stripe", "customer_id_column"),
                f"'{stripe.customer_id_column}' is not a column of {stripe.customer_id_table} in the data map",
            )

    buckets = [name for name in Settings.model_fields if name.endswith("_bucket")]
    for name, location in parts.s3.items():
        if location is not None and location.bucket_setting not in Settings.model_fields:
            add(
                ("s3", name, "bucket_setting"),
                f"'{location.bucket_setting}' is not a setting (privacy_ops.settings.Settings); "
                f"bucket settings: {', '.join(buckets)}",
            )
    for name, rule in parts.retention.items():
        if rule is not None:
            problems.extend(_retention_problems(name, rule, parts, source, buckets))
    return problems


def retention_columns(rule: RetentionRule) -> list[tuple[str, str, YamlPath]]:
    """(table, column, path below the rule) of every column a retention rule names."""
    named: list[tuple[str, str, YamlPath]] = []
    if rule.table is not None:
        for key, column in (("clock_column", rule.clock_column), ("flag_column", rule.flag_column)):
            if column is not None:
                named.append((rule.table, column, (key,)))
        if rule.younger_than is not None:
            named.append((rule.table, rule.younger_than.column, ("younger_than", "column")))
        named.extend((rule.table, column, ("columns", column)) for column in rule.columns)
    if (consent := rule.without_consent) is not None:
        for key in ("category_column", "granted_column"):
            named.append((consent.table, getattr(consent, key), ("without_consent", key)))
    return named


def account_column(table: Table) -> str | None:
    """The column of `table` holding an account id directly (a reach without `through`), if any."""
    return next((r.column for r in table.reaches if r.through is None), None)


def _retention_problems(
    name: str, rule: RetentionRule, parts: _Parts, source: _Source, buckets: list[str]
) -> Iterator[Problem]:
    path: YamlPath = ("retention", "rules", name)
    subject_table = parts.subject.table if parts.subject is not None else None
    if rule.action in ACCOUNT_ACTIONS and subject_table is not None and rule.table != subject_table:
        yield source.problem((*path, "table"), f"{rule.action} selects accounts: table must be {subject_table}")
    for table_name in filter(None, [rule.table, rule.without_consent.table if rule.without_consent else None]):
        if table_name not in parts.tables:
            key = "table" if table_name == rule.table else "without_consent"
            yield source.problem((*path, key), f"'{table_name}' is not a table of the data map (postgres.tables)")
    for table_name, column, at in retention_columns(rule):
        table = parts.tables.get(table_name)
        if table is not None and column not in known_columns(table):
            yield source.problem((*path, *at), f"'{column}' is not a column of {table_name} in the data map")
    table = parts.tables.get(rule.table) if rule.table else None
    if table is not None:
        for column, anonymiser in rule.columns.items():
            spec = table.columns.get(column)
            if anonymiser == Anonymiser.truncate_ip and spec is not None and spec.kind != Kind.ip:
                yield source.problem(
                    (*path, "columns", column), f"truncate_ip needs a column of kind ip, not {spec.kind}"
                )
            if column in table.primary_key:
                yield source.problem((*path, "columns", column), "a primary key column cannot be anonymised")
        if rule.action in ROW_ACTIONS and rule.without_consent is not None and account_column(table) is None:
            yield source.problem(
                (*path, "without_consent"),
                f"{rule.table} has no reach holding an account id: consent cannot apply",
            )
    if rule.action == RetentionAction.erase_categories:
        used = {t.category for t in parts.tables.values() if t is not None}
        for index, category in enumerate(rule.categories):
            if category not in used:
                yield source.problem(
                    (*path, "categories", index), f"no table of the data map has category {category}"
                )
    if rule.bucket_setting is not None and rule.bucket_setting not in buckets:
        yield source.problem(
            (*path, "bucket_setting"),
            f"'{rule.bucket_setting}' is not a bucket setting; bucket settings: {', '.join(buckets)}",
        )


def _through_problems(
    name: str, reach: Reach, path: YamlPath, tables: Mapping[str, Table | None], source: _Source
) -> Iterator[Problem]:
    """Follow a `through` chain: every hop a mapped table with one reach and a one-column key, ending off-chain."""
    chain = [name]
    current = reach
    while current.through is not None:
        target_name = current.through
        if target_name not in tables:
            yield source.problem(path, f"'{target_name}' is not a table of the data map (postgres.tables)")
            return
        target = tables[target_name]
        if target is None:
            return  # its own errors are reported
        if target_name in chain:
            cycle = " -> ".join([*chain, target_name])
            yield source.problem(path, f"through chain loops and never reaches an account column: {cycle}")
            return
        chain.append(target_name)
        if len(target.primary_key) != 1:
            yield source.problem(
                path,
                f"'{target_name}' has a composite primary key {target.primary_key}; "
                "a through column must reference a one-column key",
            )
            return
        if len(target.reaches) != 1:
            yield source.problem(
                path,
                f"'{target_name}' has {len(target.reaches)} reaches; a through chain must continue along exactly "
                "one, or erasure would follow the wrong relation",
            )
            return
        current = target.reaches[0]


# ---------------------------------------------------------------------------------------------------------------
# Public API


def load_datamap(path: Path) -> DataMap:
    """Read, validate and cross-check the data map at `path`; raise DataMapError listing every problem."""
    path = Path(path)
    source = _read(path)
    if source.data is None:
        raise DataMapError(source.problems or [Problem(source.file, 1, "", "the data map is empty")])
    problems = list(source.problems)
    try:
        datamap = DataMap.model_validate(source.data)
    except ValidationError as error:
        problems.extend(_validation_problems(error, source))
        problems.extend(_semantic_problems(_Parts.salvage(source.data), source))
        raise DataMapError(problems) from None
    problems.extend(_semantic_problems(_Parts.of(datamap), source))
    problems.extend(_rights_problems(datamap, source))
    if problems:
        raise DataMapError(problems)
    return datamap


def _rights_problems(datamap: DataMap, source: _Source) -> list[Problem]:
    """Every table and column the rights sections (rectification, processing, service terms) name is mapped."""
    problems: list[Problem] = []
    tables = datamap.postgres.tables

    def column_ref(reference: str, path: YamlPath) -> None:
        table_name, column = reference.split(".")
        table = tables.get(table_name)
        if table is None:
            problems.append(
                source.problem(path, f"'{table_name}' is not a table of the data map (postgres.tables)")
            )
        elif column not in known_columns(table):
            problems.append(source.problem(path, f"'{column}' is not a column of {table_name} in the data map"))

    subject = tables.get(datamap.subject.table)
    if datamap.subject.deleted_column is not None:
        column_ref(f"{datamap.subject.table}.{datamap.subject.deleted_column}", ("subject", "deleted_column"))
    for index, column in enumerate(datamap.subject.service_terms_columns):
        column_ref(f"{datamap.subject.table}.{column}", ("subject", "service_terms_columns", index))
    for name, table in tables.items():
        if table.collected_at is not None and table.collected_at not in known_columns(table):
            problems.append(
                source.problem(
                    (*_table_path(name), "collected_at"), f"'{table.collected_at}' is not a column of {name}"
                )
            )
    if datamap.rectification is not None:
        for field_name, spec in datamap.rectification.fields.items():
            for index, reference in enumerate(spec.columns):
                column_ref(reference, ("rectification", "fields", field_name, "columns", index))
            if field_name in datamap.rectification.refused:
                problems.append(
                    source.problem(
                        ("rectification", "refused", field_name), "a field is either fixable or refused"
                    )
                )
    if datamap.processing is not None:
        processing = datamap.processing
        if subject is not None and processing.restriction_column not in known_columns(subject):
            problems.append(
                source.problem(
                    ("processing", "restriction_column"),
                    f"'{processing.restriction_column}' is not a column of {datamap.subject.table}",
                )
            )
        if processing.objections_table not in tables:
            problems.append(
                source.problem(
                    ("processing", "objections_table"), f"'{processing.objections_table}' is not mapped"
                )
            )
        for purpose_name, purpose in processing.purposes.items():
            path: YamlPath = ("processing", "purposes", purpose_name)
            for key, names in (("collected", purpose.collected), ("outputs", purpose.outputs)):
                for index, table_name in enumerate(names):
                    if table_name not in tables:
                        problems.append(
                            source.problem((*path, key, index), f"'{table_name}' is not a table of the data map")
                        )
            for index, reference in enumerate(purpose.switches):
                column_ref(reference, (*path, "switches", index))
            if purpose.consent is not None and purpose.consent.table not in tables:
                problems.append(
                    source.problem((*path, "consent", "table"), f"'{purpose.consent.table}' is not mapped")
                )
    return problems


def _check_table(
    datamap: DataMap, name: str, inspector: Inspector, source: _Source
) -> tuple[list[Problem], list[Problem]]:
    """Problems and warnings (unmapped columns) of one mapped table that exists in the database."""
    schema, table, path = datamap.postgres.schema_, datamap.table(name), _table_path(name)
    problems: list[Problem] = []
    live_columns = {c["name"] for c in inspector.get_columns(name, schema=schema)}

    named: list[tuple[str, YamlPath]] = [
        *((column, (*path, "primary_key", i)) for i, column in enumerate(table.primary_key)),
        *((reach.column, (*path, "reaches", i, "column")) for i, reach in enumerate(table.reaches)),
        *((column, (*path, "columns", column)) for column in table.columns),
    ]
    if table.retention is not None:
        named.append((table.retention.clock_column, (*path, "retention", "clock_column")))
    for rule_name, rule in datamap.retention.rules.items() if datamap.retention else ():
        named.extend(
            (column, ("retention", "rules", rule_name, *at))
            for table_name, column, at in retention_columns(rule)
            if table_name == name
        )
    problems.extend(
        source.problem(at, "no such column", f"{name}.{column}")
        for column, at in named
        if column not in live_columns
    )

    live_pk = inspector.get_pk_constraint(name, schema=schema).get("constrained_columns") or []
    if set(live_pk) != set(table.primary_key):
        declared = "declared" if (*path, "primary_key") in source.lines else "the default"
        problems.append(
            source.problem(
                (*path, "primary_key"),
                f"primary_key is {table.primary_key} ({declared}) but the table's primary key is {live_pk}",
                f"{name}.primary_key",
            )
        )

    foreign_keys = inspector.get_foreign_keys(name, schema=schema)
    for index, reach in enumerate(table.reaches):
        if reach.through is None or reach.column not in live_columns:
            continue
        through = datamap.postgres.tables.get(reach.through)
        target_key = through.primary_key if through is not None else ["id"]
        if not any(
            fk["constrained_columns"] == [reach.column]
            and fk["referred_table"] == reach.through
            and fk.get("referred_schema") in (None, schema)
            and fk["referred_columns"] == target_key
            for fk in foreign_keys
        ):
            problems.append(
                source.problem(
                    (*path, "reaches", index, "through"),
                    f"no foreign key from {name}.{reach.column} to {reach.through}({', '.join(target_key)}) "
                    "in the database",
                    f"{name}.{reach.column}",
                )
            )

    warnings = [
        source.problem(
            path,
            "column not in the data map: add it to columns (kind: other if it holds nothing personal)",
            f"{name}.{column}",
        )
        for column in sorted(live_columns - set(known_columns(table)))
    ]
    return problems, warnings


def check_against_database(datamap: DataMap, bind: Engine | Connection, path: Path) -> list[Problem]:
    """Compare the map with the live schema `postgres.schema`; raise DataMapError listing every mismatch.

    Checked: every mapped table exists; every column the map names (primary key, reach, `columns`, retention clock)
    exists; the declared primary key is the table's; a `through` column has a foreign key to the through table's
    key. Returned (not raised): warnings for tables of the schema and columns of mapped tables the map does not
    name, since a new table or column holding personal data must become a data-map change.
    """
    source = _read(Path(path))
    schema = datamap.postgres.schema_
    inspector = inspect(bind)
    problems: list[Problem] = []
    warnings: list[Problem] = []

    if schema not in inspector.get_schema_names():
        raise DataMapError([source.problem(("postgres", "schema"), f"no such schema in the database: {schema}")])
    live_tables = set(inspector.get_table_names(schema=schema))

    for name in datamap.postgres.tables:
        if name not in live_tables:
            problems.append(source.problem(_table_path(name), f"no such table in schema {schema}", name))
        else:
            table_problems, table_warnings = _check_table(datamap, name, inspector, source)
            problems.extend(table_problems)
            warnings.extend(table_warnings)

    for name in sorted(live_tables - set(datamap.postgres.tables) - NOT_PERSONAL_TABLES):
        warnings.append(
            source.problem(
                ("postgres", "tables"),
                f"table of schema {schema} not in the data map: add it to postgres.tables",
                name,
            )
        )

    if problems:
        raise DataMapError(problems)
    return warnings

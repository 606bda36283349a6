"""SQL that follows the data map: which rows of a table reach a set of accounts, along each of its reaches.

Built from lightweight `sqlalchemy.table()`/`column()` constructs named by the map (schema-qualified), never from
reflected metadata, so building a statement costs nothing and needs no connection. A reach with `through` becomes a
join per hop (the reach's column = the through table's one-column key), ending at the account column of the last
reach; the account ids arrive as one bound array parameter, `root_column = ANY(:account_ids)`.

Every hop joins many-to-one, so each row of the table appears at most once per reach. Different reaches of a table
may select the same row (a project member who also owns the project): callers decide per reach what to do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import BigInteger, ColumnElement, FromClause, any_, bindparam, select, tuple_
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.sql.elements import BindParameter
from sqlalchemy.sql.expression import Select, TableClause, column, table

from privacy_ops.datamap.loader import known_columns
from privacy_ops.datamap.model import DataMap, Reach

ACCOUNT_IDS = "account_ids"

RowsSelect = Select[*tuple[Any, ...]]


def account_ids_param(name: str = ACCOUNT_IDS) -> BindParameter[Sequence[int]]:
    """The bound parameter carrying the account ids: a PostgreSQL bigint[]; pass a list of ints when executing."""
    return bindparam(name, type_=ARRAY(BigInteger))


def table_clause(datamap: DataMap, name: str) -> TableClause:
    """A schema-qualified lightweight table with every column the map names for `name`."""
    spec = datamap.table(name)
    return table(name, *(column(c) for c in known_columns(spec)), schema=datamap.postgres.schema_)


@dataclass(frozen=True)
class ReachPath:
    """How the rows of one table reach an account along one reach.

    `base` is the table itself (not aliased, so its columns can be selected by name); `from_` is `base` joined to
    every table of the chain (aliased `via1`, `via2`, ...); `account_id` is the column holding the account id at
    the end of the chain (a column of `base` when the reach has no `through`).
    """

    table_name: str
    reach: Reach
    chain: tuple[str, ...]  # the table names from `table_name` to the table holding the account id
    base: TableClause
    from_: FromClause
    account_id: ColumnElement[Any]


def reach_path(datamap: DataMap, table_name: str, reach_index: int) -> ReachPath:
    """Resolve the `through` chain of `table_name`'s reach number `reach_index` into joins and the account column.

    Assumes a map that `load_datamap` accepted (chains end, through tables have one reach and a one-column key).
    """
    reach = datamap.table(table_name).reaches[reach_index]
    base = table_clause(datamap, table_name)
    from_: FromClause = base
    current_table: FromClause = base
    current = reach
    chain = [table_name]
    while current.through is not None:
        target_name = current.through
        target_spec = datamap.table(target_name)
        target = table_clause(datamap, target_name).alias(f"via{len(chain)}")
        from_ = from_.join(target, current_table.c[current.column] == target.c[target_spec.primary_key[0]])
        chain.append(target_name)
        current_table, current = target, target_spec.reaches[0]
    return ReachPath(table_name, reach, tuple(chain), base, from_, current_table.c[current.column])


def reach_select(
    datamap: DataMap,
    table_name: str,
    reach_index: int,
    account_ids: BindParameter[Any] | None = None,
    *,
    columns: list[str] | None = None,
    with_account_id: bool = False,
) -> RowsSelect:
    """SELECT the primary key (or `columns`) of the rows of `table_name` that reach any of `account_ids`.

    `account_ids` defaults to `account_ids_param()` (bind `account_ids=[...]` when executing). With
    `with_account_id`, the account id the row reaches is added as a last column labelled `account_id`.
    The statement never correlates, so it can be used as a subquery of a DELETE or UPDATE of the same table.
    """
    path = reach_path(datamap, table_name, reach_index)
    names = columns if columns is not None else datamap.table(table_name).primary_key
    selected: list[ColumnElement[Any]] = [path.base.c[name] for name in names]
    if with_account_id:
        selected.append(path.account_id.label("account_id"))
    param = account_ids if account_ids is not None else account_ids_param()
    return select(*selected).select_from(path.from_).where(path.account_id == any_(param)).correlate(None)


def reaching_rows(
    datamap: DataMap, table_name: str, account_ids: BindParameter[Any] | None = None
) -> list[tuple[Reach, RowsSelect]]:
    """For every reach of `table_name`, in map order: the reach and the SELECT of the primary keys it reaches."""
    param = account_ids if account_ids is not None else account_ids_param()
    return [
        (reach, reach_select(datamap, table_name, index, param))
        for index, reach in enumerate(datamap.table(table_name).reaches)
    ]


def primary_key_in(datamap: DataMap, target: TableClause, rows: RowsSelect) -> ColumnElement[bool]:
    """`(primary key of target) IN (rows)`: the WHERE clause of a DELETE or UPDATE of the rows a reach selects.

    `target` is the statement's own table (from `table_clause`), so that the clause refers to it and not to a
    second copy: `t = table_clause(m, name); delete(t).where(primary_key_in(m, t, reach_select(m, name, i)))`.
    """
    key = [target.c[name] for name in datamap.table(target.name).primary_key]
    if len(key) == 1:
        return key[0].in_(rows.scalar_subquery())
    return tuple_(*key).in_(rows)

"""Legal holds: accounts or single rows that retention must not touch (litigation, tax audit) until lifted.

A hold names an account of the data map's subject table, or one row of a mapped table by its primary key (the
columns joined by "," as `privacy_ops.retained_records` writes them). Placing and lifting are audited in the same
transaction; the audit entry names the hold id, its scope and table, and the account only as a keyed hash. Holds
are never deleted: lifting one sets lifted_at. Functions take a Connection and never commit.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Text, cast, func, insert, select, update
from sqlalchemy.engine import Connection

from privacy_ops.datamap.model import DataMap
from privacy_ops.datamap.sql import table_clause
from privacy_ops.lifecycle import audit
from privacy_ops.lifecycle.schema import legal_holds
from privacy_ops.pii import subject_hash


class HoldError(ValueError):
    """A hold cannot be placed or lifted; the message names ids and tables, never personal values."""


@dataclass(frozen=True)
class Hold:
    id: int
    account_id: int | None
    table_name: str | None
    row_key: str | None
    reason: str
    placed_by: str
    placed_at: datetime
    lifted_at: datetime | None

    @property
    def scope(self) -> str:
        return "account" if self.account_id is not None else "row"


def _audit(
    connection: Connection, secret_key: str, outcome: str, hold_id: int, account_id: int | None, table: str | None
) -> None:
    audit.record(
        connection,
        step="legal_hold",
        outcome=outcome,
        request_id=None,
        subject_hash=subject_hash(secret_key, f"account:{account_id}") if account_id is not None else None,
        details={"hold_id": hold_id, "scope": "account" if account_id is not None else "row", "table": table},
    )


def _check_text(name: str, value: str) -> str:
    value = value.strip()
    if not value:
        raise HoldError(f"{name} is required")
    audit.check_no_personal_data(value, name)
    return value


def place_hold(
    connection: Connection,
    datamap: DataMap,
    *,
    secret_key: str,
    reason: str,
    placed_by: str,
    now: datetime,
    account_id: int | None = None,
    table: str | None = None,
    row_key: str | None = None,
) -> int:
    """Hold an account (account_id) or one row (table + row_key); returns the hold id. An unknown account, table
    or row raises HoldError and changes nothing. Reason and placed_by must not hold an email or IP address."""
    if (account_id is None) == (table is None and row_key is None) or (table is None) != (row_key is None):
        raise HoldError("give either an account id, or a table and a row key")
    reason, placed_by = _check_text("reason", reason), _check_text("placed_by", placed_by)
    if account_id is not None:
        subject = datamap.subject
        accounts = table_clause(datamap, subject.table)
        found = connection.execute(
            select(accounts.c[subject.id_column]).where(accounts.c[subject.id_column] == account_id)
        ).first()
        if found is None:
            raise HoldError(f"no account {account_id}: nothing held")
    else:
        assert table is not None and row_key is not None
        if table not in datamap.postgres.tables:
            raise HoldError(f"'{table}' is not a table of the data map: nothing held")
        target = table_clause(datamap, table)
        key = func.concat_ws(",", *(cast(target.c[k], Text) for k in datamap.table(table).primary_key))
        if connection.execute(select(key).select_from(target).where(key == row_key)).first() is None:
            raise HoldError(f"no row of {table} with that primary key: nothing held")
    hold_id = connection.execute(
        insert(legal_holds)
        .values(
            account_id=account_id,
            table_name=table,
            row_key=row_key,
            reason=reason,
            placed_by=placed_by,
            placed_at=now,
        )
        .returning(legal_holds.c.id)
    ).scalar_one()
    _audit(connection, secret_key, "placed", hold_id, account_id, table)
    return int(hold_id)


def lift_hold(connection: Connection, *, secret_key: str, hold_id: int, lifted_by: str, now: datetime) -> None:
    """Lift an active hold; HoldError if there is no such active hold."""
    lifted_by = _check_text("lifted_by", lifted_by)
    row = connection.execute(
        update(legal_holds)
        .where(legal_holds.c.id == hold_id, legal_holds.c.lifted_at.is_(None))
        .values(lifted_at=now, lifted_by=lifted_by)
        .returning(legal_holds.c.account_id, legal_holds.c.table_name)
    ).first()
    if row is None:
        raise HoldError(f"no active legal hold {hold_id}")
    _audit(connection, secret_key, "lifted", hold_id, row.account_id, row.table_name)


def list_holds(connection: Connection, *, active_only: bool = True) -> list[Hold]:
    query = select(legal_holds).order_by(legal_holds.c.id)
    if active_only:
        query = query.where(legal_holds.c.lifted_at.is_(None))
    return [_hold(row._mapping) for row in connection.execute(query)]


def _hold(row: Any) -> Hold:
    return Hold(
        id=int(row["id"]),
        account_id=row["account_id"],
        table_name=row["table_name"],
        row_key=row["row_key"],
        reason=row["reason"],
        placed_by=row["placed_by"],
        placed_at=row["placed_at"],
        lifted_at=row["lifted_at"],
    )

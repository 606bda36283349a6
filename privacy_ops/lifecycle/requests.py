"""Request records: intake, status changes and deadlines, shared by every right.

All functions take a SQLAlchemy Connection and run in the caller's transaction: the caller (a task) owns the
commit, so a request change and its audit entry land together or not at all.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import insert, or_, select, text, update
from sqlalchemy.engine import Connection

from privacy_ops.lifecycle.schema import requests


class Right(StrEnum):
    access = "access"  # GDPR art. 15
    erasure = "erasure"  # GDPR art. 17, CCPA right to delete
    rectification = "rectification"  # GDPR art. 16
    restriction = "restriction"  # GDPR art. 18
    objection = "objection"  # GDPR art. 21
    portability = "portability"  # GDPR art. 20
    know = "know"  # CCPA right to know
    opt_out = "opt_out"  # CCPA opt-out of sale/sharing


class Regulation(StrEnum):
    GDPR = "GDPR"
    CCPA = "CCPA"


class Status(StrEnum):
    received = "received"
    awaiting_verification = "awaiting_verification"
    verified = "verified"
    completed = "completed"
    no_data_held = "no_data_held"
    denied = "denied"
    duplicate = "duplicate"  # the same person and right while another request is open: linked to it, not done
    failed = "failed"


FINAL = frozenset({Status.completed, Status.no_data_held, Status.denied, Status.duplicate})

# Statutory deadlines: GDPR art. 12(3) one month, CCPA §1798.130 45 days. (The policy promises an answer within
# 30 days; the deadline watchdog warns 7 days ahead, so CCPA answers normally go out well inside that.)
RESPONSE_DAYS = {Regulation.GDPR: 30, Regulation.CCPA: 45}


class RequestNotFound(LookupError):
    """No request with that id (the message names only the id)."""


@dataclass(frozen=True)
class Request:
    id: str
    right: Right
    regulation: Regulation
    status: Status
    subject_hash: str
    account_ids: tuple[int, ...]
    received_at: datetime
    due_at: datetime
    requested_by: str
    flow_run_id: str | None
    outcome: dict[str, Any]

    @property
    def days_left(self) -> int:
        return (self.due_at - datetime.now(self.due_at.tzinfo)).days


def new_request_id() -> str:
    return "req_" + secrets.token_hex(5)


def due_date(regulation: Regulation, received_at: datetime) -> datetime:
    return received_at + timedelta(days=RESPONSE_DAYS[regulation])


def open_request(
    connection: Connection,
    *,
    right: Right,
    regulation: Regulation,
    subject_hash: str,
    requested_by: str,
    flow_run_id: str | None,
    now: datetime,
) -> tuple[Request, bool]:
    """Create the request record, or return the one this flow run already created (intake is idempotent).

    Returns (request, created).
    """
    if flow_run_id is not None:
        existing = connection.execute(select(requests).where(requests.c.flow_run_id == flow_run_id)).first()
        if existing is not None:
            return _request(existing._mapping), False
    row = connection.execute(
        insert(requests)
        .values(
            id=new_request_id(),
            flow_run_id=flow_run_id,
            right=right.value,
            regulation=regulation.value,
            status=Status.received.value,
            subject_hash=subject_hash,
            received_at=now,
            due_at=due_date(regulation, now),
            requested_by=requested_by,
        )
        .returning(requests)
    ).one()
    return _request(row._mapping), True


def open_duplicate_of(connection: Connection, request: Request) -> str | None:
    """The id of an earlier open request (not final) of the same right for any of the request's accounts."""
    if not request.account_ids:
        return None
    shared = text(
        "EXISTS (SELECT 1 FROM jsonb_array_elements(requests.account_ids) a WHERE a::bigint = ANY(:ids))"
    )
    return connection.execute(
        select(requests.c.id)
        .where(
            requests.c.right == request.right.value,
            requests.c.id != request.id,
            requests.c.received_at <= request.received_at,
            requests.c.status.not_in([s.value for s in FINAL]),
            shared.bindparams(ids=list(request.account_ids)),
        )
        .order_by(requests.c.received_at)
        .limit(1)
    ).scalar_one_or_none()


def get_request(connection: Connection, request_id: str) -> Request:
    row = connection.execute(select(requests).where(requests.c.id == request_id)).first()
    if row is None:
        raise RequestNotFound(f"no request {request_id}")
    return _request(row._mapping)


def set_status(connection: Connection, request_id: str, status: Status, *, now: datetime | None = None) -> None:
    values: dict[str, Any] = {"status": status.value}
    if status in FINAL:
        values["completed_at"] = now or datetime.now().astimezone()
    connection.execute(update(requests).where(requests.c.id == request_id).values(**values))


def set_accounts(connection: Connection, request_id: str, account_ids: list[int]) -> None:
    connection.execute(update(requests).where(requests.c.id == request_id).values(account_ids=account_ids))


def merge_outcome(connection: Connection, request_id: str, outcome: dict[str, Any]) -> None:
    """Add keys to the request's outcome (counts per store, export key, check verdicts): no personal data."""
    connection.execute(
        update(requests).where(requests.c.id == request_id).values(outcome=requests.c.outcome.op("||")(outcome))
    )


def list_requests(connection: Connection, *, open_only: bool = True) -> list[Request]:
    query = select(requests).order_by(requests.c.due_at)
    if open_only:
        query = query.where(requests.c.status.not_in([s.value for s in FINAL]))
    return [_request(row._mapping) for row in connection.execute(query)]


def _request(row: Any) -> Request:
    return Request(
        id=row["id"],
        right=Right(row["right"]),
        regulation=Regulation(row["regulation"]),
        status=Status(row["status"]),
        subject_hash=row["subject_hash"],
        account_ids=tuple(row["account_ids"]),
        received_at=row["received_at"],
        due_at=row["due_at"],
        requested_by=row["requested_by"],
        flow_run_id=row["flow_run_id"],
        outcome=dict(row["outcome"]),
    )


def history_for_accounts(connection: Connection, account_ids: list[int]) -> list[dict[str, Any]]:
    """The privacy requests that concerned these accounts (for the access package): ids, rights, dates, status."""
    rows = connection.execute(
        select(
            requests.c.id,
            requests.c.right,
            requests.c.regulation,
            requests.c.status,
            requests.c.received_at,
            requests.c.completed_at,
        )
        .where(or_(*(requests.c.account_ids.contains([account_id]) for account_id in account_ids)))
        .order_by(requests.c.received_at)
    )
    return [dict(row._mapping) for row in rows]

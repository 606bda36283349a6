"""Deadline watchdog steps: find open requests near or past their deadline, page, tell compliance ops, record.

Everything here handles request ids, rights, statuses and dates only: the request record holds no personal data,
and nothing else is read. "Days left" counts calendar days in UTC from the run's `as_of` date to the due date
(0 = due that day, negative = overdue).

The day's report is claimed once per `as_of` date in `privacy_ops.notifications` (request_id
`deadline-watchdog-YYYY-MM-DD`, kind `deadline_summary`), with the protocol `notify.send_once` uses: claim the row
in its own transaction, then send while holding its lock and mark it sent in the same transaction. A rerun the
same day (or a racing one) finds it sent and sends nothing; a run whose SMTP call failed left it unsent and a rerun
tries again. Events carry ids derived from request, date and state, so a re-emitted event is stored once.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from sqlalchemy import select, text

from privacy_ops.lifecycle import audit, notify
from privacy_ops.lifecycle.requests import FINAL
from privacy_ops.lifecycle.schema import SCHEMA
from privacy_ops.lifecycle.schema import requests as requests_table
from privacy_ops.services import Services

DUE_SOON_EVENT = "privacy-ops.request.due-soon"
OVERDUE_EVENT = "privacy-ops.request.overdue"
SUMMARY_KIND = "deadline_summary"
ARTIFACT_KEY = "deadline-watchdog"
# Event ids are uuid5(namespace, "<request id>:<as_of>:<state>"): the same finding on the same day is one event.
_EVENT_NAMESPACE = uuid.UUID("5c1d0a52-5b1e-4a43-9e36-2a4c0f1f7d11")

_CLAIM = text(
    f"INSERT INTO {SCHEMA}.notifications (request_id, kind, status, message_id, claimed_at) "
    "VALUES (:request_id, :kind, 'sending', :message_id, now()) ON CONFLICT (request_id, kind) DO NOTHING"
)
_LOCK = text(
    f"SELECT status FROM {SCHEMA}.notifications WHERE request_id = :request_id AND kind = :kind FOR UPDATE"
)
_STATUS = text(f"SELECT status FROM {SCHEMA}.notifications WHERE request_id = :request_id AND kind = :kind")
_MARK_SENT = text(
    f"UPDATE {SCHEMA}.notifications SET status = 'sent', sent_at = now() "
    "WHERE request_id = :request_id AND kind = :kind"
)


@dataclass(frozen=True)
class Deadline:
    """One open request that is overdue or due within the window: ids, dates and counts only."""

    request_id: str
    right: str
    regulation: str
    status: str
    due_date: date
    days_left: int

    @property
    def overdue(self) -> bool:
        return self.days_left < 0

    @property
    def state(self) -> str:
        return "overdue" if self.overdue else "due_soon"

    def row(self) -> dict[str, Any]:
        """The artifact's, the email's and the audit entry's view of it (JSON-able)."""
        return {**asdict(self), "due_date": self.due_date.isoformat(), "state": self.state}


def report_key(as_of: date) -> str:
    """The claim's request_id: one summary per watchdog day."""
    return f"deadline-watchdog-{as_of.isoformat()}"


def check_as_of(as_of: date, today: date | None = None) -> date:
    """as_of may be today or earlier (tests and catch-up runs move the clock back, never forward)."""
    today = today or datetime.now(UTC).date()
    if as_of > today:
        raise ValueError(f"as_of {as_of.isoformat()} is in the future (today is {today.isoformat()})")
    return as_of


@task(cache_policy=NO_CACHE, persist_result=False, retries=2, retry_delay_seconds=5)
def find_deadlines(services: Services, as_of: date, window_days: int) -> list[Deadline]:
    """Open requests due on or before `as_of` + `window_days` (overdue ones included), soonest first: one query."""
    horizon = datetime.combine(as_of + timedelta(days=window_days + 1), time.min, tzinfo=UTC)
    query = (
        select(
            requests_table.c.id,
            requests_table.c.right,
            requests_table.c.regulation,
            requests_table.c.status,
            requests_table.c.due_at,
        )
        .where(requests_table.c.status.not_in([status.value for status in FINAL]))
        .where(requests_table.c.due_at < horizon)
        .order_by(requests_table.c.due_at, requests_table.c.id)
    )
    with services.engine.connect() as connection:
        rows = connection.execute(query).all()
    found = []
    for row in rows:
        due_date = row.due_at.astimezone(UTC).date()
        found.append(
            Deadline(
                request_id=row.id,
                right=row.right,
                regulation=row.regulation,
                status=row.status,
                due_date=due_date,
                days_left=(due_date - as_of).days,
            )
        )
    return found


def event_id(deadline: Deadline, as_of: date) -> uuid.UUID:
    return uuid.uuid5(_EVENT_NAMESPACE, f"{deadline.request_id}:{as_of.isoformat()}:{deadline.state}")


@task(cache_policy=NO_CACHE, persist_result=False)
def emit_deadline_events(deadlines: list[Deadline], as_of: date) -> int:
    """One Prefect event per request (`privacy-ops.request.due-soon` / `.overdue`), for automations to page on."""
    from prefect.events import emit_event

    for deadline in deadlines:
        emit_event(
            event=OVERDUE_EVENT if deadline.overdue else DUE_SOON_EVENT,
            resource={
                "prefect.resource.id": f"privacy-ops.request.{deadline.request_id}",
                "prefect.resource.name": deadline.request_id,
                "privacy-ops.right": deadline.right,
                "privacy-ops.regulation": deadline.regulation,
            },
            payload={
                "as_of": as_of.isoformat(),
                "due_date": deadline.due_date.isoformat(),
                "days_left": deadline.days_left,
                "status": deadline.status,
            },
            id=event_id(deadline, as_of),
        )
    return len(deadlines)


@task(cache_policy=NO_CACHE, persist_result=False, retries=2, retry_delay_seconds=5)
def summary_already_sent(services: Services, as_of: date) -> bool:
    """Whether the day's summary went out already (a rerun emits and sends nothing more)."""
    with services.engine.connect() as connection:
        status = connection.execute(
            _STATUS, {"request_id": report_key(as_of), "kind": SUMMARY_KIND}
        ).scalar_one_or_none()
    return status == "sent"


def summary_text(as_of: date, deadlines: list[Deadline], window_days: int) -> tuple[str, str]:
    """Subject and body of the compliance summary: request ids, rights, due dates and days left only."""
    overdue = [d for d in deadlines if d.overdue]
    due_soon = [d for d in deadlines if not d.overdue]
    subject = (
        f"[privacy-ops] deadlines {as_of.isoformat()}: {len(overdue)} overdue, "
        f"{len(due_soon)} due within {window_days} days"
    )
    lines = [f"Open privacy requests as of {as_of.isoformat()} (days counted in UTC).", ""]
    for title, group in (("OVERDUE", overdue), (f"DUE WITHIN {window_days} DAYS", due_soon)):
        lines.append(f"{title} ({len(group)})")
        lines += [
            f"  {d.request_id}  {d.right:<8} {d.regulation:<5} {d.status:<22} due {d.due_date.isoformat()} "
            f"({d.days_left} days left)"
            for d in group
        ] or ["  none"]
        lines.append("")
    lines.append("See `privacy-ops requests`; resume a failed one: `privacy-ops request RIGHT --resume ID`.")
    return subject, "\n".join(lines) + "\n"


@task(cache_policy=NO_CACHE, persist_result=False, retries=2, retry_delay_seconds=10)
def send_deadline_summary(services: Services, as_of: date, deadlines: list[Deadline], window_days: int) -> bool:
    """One summary email to compliance ops per `as_of` day; True if this call sent it (False: sent already, or
    nothing to report). Same exactly-once window as `notify.send_once`: a crash between the SMTP server accepting
    and the commit makes a rerun send it again."""
    if not deadlines:
        return False
    keys = {"request_id": report_key(as_of), "kind": SUMMARY_KIND}
    subject, body = summary_text(as_of, deadlines, window_days)
    with services.engine.begin() as connection:
        connection.execute(_CLAIM, {**keys, "message_id": notify.message_id_for(keys["request_id"], SUMMARY_KIND)})
    with services.engine.begin() as connection:
        if connection.execute(_LOCK, keys).scalar_one() == "sent":
            return False
        notify.send_operator_mail(services.settings, services.settings.compliance_email, subject, body)
        connection.execute(_MARK_SENT, keys)
    return True


@task(cache_policy=NO_CACHE, persist_result=False)
def publish_deadline_artifact(as_of: date, deadlines: list[Deadline], window_days: int) -> None:
    """The compliance console's view: a table of the requests found (ids, rights, due dates, days left)."""
    from prefect.artifacts import create_table_artifact

    overdue = sum(1 for d in deadlines if d.overdue)
    create_table_artifact(
        key=ARTIFACT_KEY,
        table=[d.row() for d in deadlines],
        description=(
            f"Deadlines as of {as_of.isoformat()}: {overdue} overdue, "
            f"{len(deadlines) - overdue} due within {window_days} days"
        ),
    )


@task(cache_policy=NO_CACHE, persist_result=False, retries=2, retry_delay_seconds=5)
def record_watchdog_run(
    services: Services, as_of: date, deadlines: list[Deadline], window_days: int, email: str
) -> bool:
    """The day's findings in the audit log, once per `as_of` date; True if this call recorded them."""
    overdue = sum(1 for d in deadlines if d.overdue)
    details = {
        "as_of": as_of.isoformat(),
        "window_days": window_days,
        "overdue": overdue,
        "due_soon": len(deadlines) - overdue,
        "email": email,
        "requests": [
            {"id": d.request_id, "right": d.right, "due_date": d.due_date.isoformat(), "days_left": d.days_left}
            for d in deadlines
        ],
    }
    with services.engine.begin() as connection:
        entry = audit.record(
            connection,
            step="deadline_watchdog",
            outcome="reported" if deadlines else "nothing_due",
            request_id=None,
            subject_hash=None,
            details=details,
            idempotency_key=f"deadline-watchdog:{as_of.isoformat()}",
        )
    return entry is not None

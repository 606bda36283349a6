"""Deadline watchdog: every day, the open requests due within 7 days and those already overdue.

find (one query over the request records) -> page (a Prefect event per request, for an automation to page
someone) -> tell compliance ops (one summary email per day) -> show (a table artifact) -> record (audit log).
A rerun the same day sends no second email and emits no second set of events; the artifact is refreshed.
Only request ids, rights, statuses, due dates and days left leave the database: no personal data.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

from prefect import flow, get_run_logger
from pydantic import BaseModel, ConfigDict, Field, field_validator

from privacy_ops.services import services as connect
from tasks.watchdog import (
    check_as_of,
    emit_deadline_events,
    find_deadlines,
    publish_deadline_artifact,
    record_watchdog_run,
    send_deadline_summary,
    summary_already_sent,
)

WARN_DAYS = 7  # the policy: compliance ops hear of a request a week before its deadline


class WatchdogRun(BaseModel):
    """What to check: the schedule uses the defaults; a manual run may look at an earlier day."""

    model_config = ConfigDict(extra="forbid")

    as_of: date | None = Field(
        default=None, description="The day to check (default today, UTC); never in the future"
    )
    window_days: int = Field(
        default=WARN_DAYS, ge=1, le=45, description="Report requests due within this many days (and overdue ones)"
    )

    @field_validator("as_of")
    @classmethod
    def _not_future(cls, value: date | None) -> date | None:
        return None if value is None else check_as_of(value)


@flow(name="deadline-watchdog", log_prints=False)
def deadline_watchdog(params: WatchdogRun | None = None) -> dict[str, Any]:
    """Report requests due soon or overdue; returns the counts and whether this run sent the summary."""
    params = params or WatchdogRun()
    services = connect()
    as_of = check_as_of(params.as_of or datetime.now(UTC).date())
    deadlines = find_deadlines(services, as_of, params.window_days)

    if summary_already_sent(services, as_of):
        email = "already_sent"
    else:
        emit_deadline_events(deadlines, as_of)
        sent = send_deadline_summary(services, as_of, deadlines, params.window_days)
        email = "sent" if sent else ("nothing_to_report" if not deadlines else "already_sent")
    publish_deadline_artifact(as_of, deadlines, params.window_days)
    record_watchdog_run(services, as_of, deadlines, params.window_days, email)

    overdue = sum(1 for d in deadlines if d.overdue)
    get_run_logger().info(
        "as of %s: %d overdue, %d due within %d days; summary email %s",
        as_of.isoformat(),
        overdue,
        len(deadlines) - overdue,
        params.window_days,
        email,
    )
    return {
        "as_of": as_of.isoformat(),
        "overdue": overdue,
        "due_soon": len(deadlines) - overdue,
        "requests": [d.request_id for d in deadlines],
        "email": email,
    }

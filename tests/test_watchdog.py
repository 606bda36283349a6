"""The deadline watchdog against the real local stack: request rows planted around a past day, the flow run for
that day; the summary read back from the SMTP sink, the events from Prefect's events API, the artifact from
Prefect's artifacts API, the entry from the audit log."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from email.message import EmailMessage
from typing import Any

import pytest
from sqlalchemy import Engine, insert, text

from flows.deadline_watchdog import WatchdogRun, deadline_watchdog
from privacy_ops.lifecycle import audit
from privacy_ops.lifecycle.schema import requests as requests_table
from privacy_ops.services import Services, reset_cache, services
from tasks.watchdog import DUE_SOON_EVENT, OVERDUE_EVENT

# A day long past: requests other tests open now are due weeks after it, so only the planted ones are found.
AS_OF = date(2021, 3, 15)


@pytest.fixture(scope="module")
def svc(stack: Any) -> Iterator[Services]:
    reset_cache()
    yield services()  # creates the privacy_ops schema
    reset_cache()


def _at(day: date, hour: int = 12, minute: int = 0) -> datetime:
    return datetime(day.year, day.month, day.day, hour, minute, tzinfo=UTC)


def _plant(engine: Engine, cases: dict[str, tuple[str, datetime]]) -> dict[str, str]:
    """Insert one request per case (status, due_at); returns case -> request id."""
    ids = {case: f"req_wd{secrets.token_hex(4)}" for case in cases}
    with engine.begin() as connection:
        for case, (status, due_at) in cases.items():
            connection.execute(
                insert(requests_table).values(
                    id=ids[case],
                    right="erasure" if len(case) % 2 else "access",
                    regulation="GDPR",
                    status=status,
                    subject_hash="0" * 64,
                    received_at=due_at - timedelta(days=30),
                    due_at=due_at,
                    requested_by="test",
                )
            )
    return ids


def _summaries(read_mail: Callable[[], list[EmailMessage]], day: date) -> list[EmailMessage]:
    return [m for m in read_mail() if f"deadlines {day.isoformat()}" in str(m["Subject"])]


def _events(resource_ids: list[str], expected: int, timeout: float = 60) -> list[Any]:
    """The watchdog's events for these resources, read back from Prefect's events API (stored asynchronously)."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
    from prefect.events.worker import EventsWorker

    EventsWorker.drain_all(timeout=15)
    event_filter = EventFilter(
        event=EventNameFilter(prefix=["privacy-ops.request."]),
        resource=EventResourceFilter(id=resource_ids),
    )
    deadline = time.monotonic() + timeout
    while True:
        with get_client(sync_client=True) as client:
            events = client.read_events(filter=event_filter, limit=50).events
        if len(events) >= expected or time.monotonic() > deadline:
            return events
        time.sleep(1)


def test_reports_due_soon_and_overdue_requests_once_a_day(
    svc: Services, engine: Engine, read_mail: Callable[[], list[EmailMessage]]
) -> None:
    ids = _plant(
        engine,
        {
            "overdue": ("received", _at(AS_OF - timedelta(days=5))),
            "failed_overdue": ("failed", _at(AS_OF - timedelta(days=1), 23, 30)),
            "due_today": ("awaiting_verification", _at(AS_OF, 0, 5)),
            "due_in_7": ("verified", _at(AS_OF + timedelta(days=7), 23, 59)),
            "due_in_8": ("received", _at(AS_OF + timedelta(days=8), 0, 1)),
            "completed_overdue": ("completed", _at(AS_OF - timedelta(days=3))),
            "denied_due_soon": ("denied", _at(AS_OF + timedelta(days=2))),
        },
    )
    from prefect.states import State

    state: State[Any] = deadline_watchdog(WatchdogRun(as_of=AS_OF), return_state=True)
    report = state.result()

    expected = {
        ids["overdue"]: -5,
        ids["failed_overdue"]: -1,
        ids["due_today"]: 0,
        ids["due_in_7"]: 7,
    }
    assert report["requests"] == list(expected)  # soonest first
    assert (report["overdue"], report["due_soon"], report["email"]) == (2, 2, "sent")

    mails = _summaries(read_mail, AS_OF)
    assert len(mails) == 1
    assert mails[0]["To"] == svc.settings.compliance_email
    body = mails[0].get_body(preferencelist=("plain",))
    assert body is not None
    content = body.get_content()
    for request_id, days_left in expected.items():
        assert request_id in content and f"({days_left} days left)" in content
    for absent in ("due_in_8", "completed_overdue", "denied_due_soon"):
        assert ids[absent] not in content
    assert "@" not in content  # ids, rights, dates: no address, no personal data

    events = _events([f"privacy-ops.request.{i}" for i in ids.values()], expected=len(expected))
    found = {e.resource.id.removeprefix("privacy-ops.request."): e for e in events}
    assert set(found) == set(expected)
    for request_id, days_left in expected.items():
        event = found[request_id]
        assert event.event == (OVERDUE_EVENT if days_left < 0 else DUE_SOON_EVENT)
        assert event.payload["days_left"] == days_left
        assert event.payload["due_date"] == (AS_OF + timedelta(days=days_left)).isoformat()

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    run_id = state.state_details.flow_run_id
    assert run_id is not None
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )
    assert [a.key for a in artifacts] == ["deadline-watchdog"]
    assert all(request_id in str(artifacts[0].data) for request_id in expected)
    assert ids["due_in_8"] not in str(artifacts[0].data)

    # The same day again: no second email, no second set of events, no second audit entry.
    again = deadline_watchdog(WatchdogRun(as_of=AS_OF))
    assert again["email"] == "already_sent" and again["requests"] == list(expected)
    assert len(_summaries(read_mail, AS_OF)) == 1
    assert len(_events([f"privacy-ops.request.{i}" for i in expected], expected=99, timeout=5)) == len(expected)
    with engine.connect() as connection:
        entries = connection.execute(
            text("SELECT outcome, details FROM privacy_ops.audit_log WHERE idempotency_key = :k"),
            {"k": f"deadline-watchdog:{AS_OF.isoformat()}"},
        ).all()
        chain = audit.verify(connection)
    assert len(entries) == 1 and entries[0].outcome == "reported"
    assert entries[0].details["overdue"] == 2 and entries[0].details["email"] == "sent"
    assert [r["id"] for r in entries[0].details["requests"]] == list(expected)
    assert chain.ok, chain.problems


def test_a_quiet_day_sends_nothing(svc: Services, read_mail: Callable[[], list[EmailMessage]]) -> None:
    quiet = date(2019, 6, 1)
    report = deadline_watchdog(WatchdogRun(as_of=quiet))
    assert report["requests"] == [] and report["email"] == "nothing_to_report"
    assert _summaries(read_mail, quiet) == []


def test_as_of_never_in_the_future() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="future"):
        WatchdogRun(as_of=datetime.now(UTC).date() + timedelta(days=2))


def test_cli_runs_the_watchdog(svc: Services, read_mail: Callable[[], list[EmailMessage]]) -> None:
    import typer
    from typer.testing import CliRunner

    from privacy_ops.cli_operations import watchdog_app

    cli = typer.Typer()
    cli.add_typer(watchdog_app, name="watchdog")  # as privacy_ops/cli.py registers it
    result = CliRunner().invoke(cli, ["watchdog", "run", "--as-of", "2018-01-01"])
    assert result.exit_code == 0, result.output
    assert "0 overdue, 0 due within 7 days; summary email nothing to report" in result.output
    refused = CliRunner().invoke(cli, ["watchdog", "run", "--as-of", "2999-01-01"])
    assert refused.exit_code == 1 and "future" in refused.output

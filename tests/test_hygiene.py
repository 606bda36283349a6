"""Orchestrator hygiene against the stack's real Prefect server: tiny flows named like the request flows run for
real (so they have end times and logs), others are created in non-final states; the cutoff falls between the
"old" runs and a recent one (`finished_before`, since Prefect stamps end times itself and they cannot be
backdated through its API)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import pytest
from prefect import flow, get_run_logger
from sqlalchemy import Engine, text

from flows.orchestrator_hygiene import HygieneRun, orchestrator_hygiene
from privacy_ops.services import Services, reset_cache, services


@flow(name="access-request")
def access_stub(note: str = "intake") -> None:
    get_run_logger().info("stub access run: %s", note)


@flow(name="erasure-request")
def erasure_stub() -> None:
    get_run_logger().info("stub erasure run about to fail")
    raise RuntimeError("act step failed")


@flow(name="nightly-retention")
def other_stub() -> None:
    get_run_logger().info("a finished run of another flow")


@pytest.fixture(scope="module")
def svc(stack: Any) -> Iterator[Services]:
    reset_cache()
    yield services()
    reset_cache()


def _run(fn: Any) -> UUID:
    state = fn(return_state=True)
    run_id = state.state_details.flow_run_id
    assert run_id is not None
    return UUID(str(run_id))


def _created(fn: Any, state: Any) -> UUID:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.create_flow_run(fn, state=state).id


def _exists(run_id: UUID) -> bool:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_flow_run(run_id)
        except ObjectNotFound:
            return False
    return True


def _log_count(run_id: UUID) -> int:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        return len(client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id]))))


def _eventually(predicate: Any, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(1)
    return True


def _entries(engine: Engine) -> list[Any]:
    with engine.connect() as connection:
        return list(
            connection.execute(
                text(
                    "SELECT outcome, details FROM privacy_ops.audit_log WHERE step = 'orchestrator_hygiene' "
                    "ORDER BY seq"
                )
            )
        )


def test_deletes_only_finished_request_runs_older_than_the_cutoff(svc: Services, engine: Engine) -> None:
    from prefect.logging.handlers import APILogWorker
    from prefect.states import Paused, Running, Scheduled

    old_completed = _run(access_stub)
    old_failed = _run(erasure_stub)
    old_other_flow = _run(other_stub)
    running = _created(access_stub, Running())
    paused = _created(erasure_stub, Paused())
    scheduled = _created(access_stub, Scheduled())
    APILogWorker.drain_all(timeout=15)
    assert _eventually(lambda: _log_count(old_completed) > 0), "the stub run's logs reach Prefect"
    time.sleep(1.5)
    cutoff = datetime.now(UTC)
    time.sleep(1.5)
    recent_completed = _run(access_stub)
    kept = [old_other_flow, running, paused, scheduled, recent_completed]
    entries_before = len(_entries(engine))

    # The default period (30 days) keeps every run of this session.
    assert orchestrator_hygiene(HygieneRun())["total"] == 0
    assert all(_exists(r) for r in [old_completed, old_failed, *kept])

    preview = orchestrator_hygiene(HygieneRun(finished_before=cutoff, dry_run=True))
    assert preview["dry_run"] is True and preview["batches"] == 0
    assert preview["runs"]["access-request"] >= 1 and preview["runs"]["erasure-request"] >= 1
    assert all(_exists(r) for r in [old_completed, old_failed, *kept]), "a dry run deletes nothing"

    report = orchestrator_hygiene(HygieneRun(finished_before=cutoff, batch_size=1))
    assert report["runs"] == preview["runs"] and report["total"] == preview["total"]
    assert report["batches"] == report["total"]  # one run per batch
    assert not _exists(old_completed) and not _exists(old_failed)
    assert all(_exists(r) for r in kept), "running, paused, scheduled, recent and other flows' runs stay"
    assert _eventually(lambda: _log_count(old_completed) == 0), "Prefect deletes a deleted run's logs"

    again = orchestrator_hygiene(HygieneRun(finished_before=cutoff))
    assert again["total"] == 0  # converged

    entries = _entries(engine)[entries_before:]
    assert [e.outcome for e in entries] == ["deleted", "dry_run", "deleted", "deleted"]
    recorded = entries[2].details
    assert recorded["runs"] == report["runs"] and recorded["total"] == report["total"]
    assert set(recorded) == {"dry_run", "cutoff", "older_than_days", "runs", "total", "batches"}  # counts only
    assert str(old_completed) not in str(recorded)


def test_the_period_must_be_positive_and_the_cutoff_past() -> None:
    from datetime import timedelta

    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        HygieneRun(older_than_days=0)
    with pytest.raises(ValidationError, match="future"):
        HygieneRun(finished_before=datetime.now(UTC) + timedelta(hours=1))


def test_cli_dry_run(svc: Services) -> None:
    import typer
    from typer.testing import CliRunner

    from privacy_ops.cli_operations import hygiene_app

    cli = typer.Typer()
    cli.add_typer(hygiene_app, name="hygiene")  # as privacy_ops/cli.py registers it
    result = CliRunner().invoke(cli, ["hygiene", "run", "--dry-run", "--older-than-days", "30"])
    assert result.exit_code == 0, result.output
    assert "would delete 0 finished request flow run(s)" in result.output
    refused = CliRunner().invoke(cli, ["hygiene", "run", "--older-than-days", "0"])
    assert refused.exit_code == 1 and "greater than 0" in refused.output

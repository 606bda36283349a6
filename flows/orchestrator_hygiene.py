"""Orchestrator hygiene: delete finished request flow runs (and so their logs) from Prefect after a set period.

A request's intake parameter (the email a person typed) is the one piece of personal data Prefect holds; it lives
as long as its flow run. Every day this job deletes the finished runs of the request flows older than
`older_than_days` (default 30), in batches, and records the counts in the audit log. A dry run only counts.
Running, paused, suspended and scheduled runs are never touched, nor runs of any other flow.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator

from privacy_ops.services import services as connect
from tasks.hygiene import (
    MAX_BATCH,
    REQUEST_FLOWS,
    count_finished_runs,
    delete_runs,
    finished_run_ids,
    record_hygiene_run,
)

DEFAULT_OLDER_THAN_DAYS = 30


class HygieneRun(BaseModel):
    """What to clean: the schedule uses the defaults."""

    model_config = ConfigDict(extra="forbid")

    older_than_days: int = Field(
        default=DEFAULT_OLDER_THAN_DAYS,
        gt=0,
        le=3650,
        description="Delete finished request runs that ended more than this many days ago",
    )
    dry_run: bool = Field(default=False, description="Only count what would be deleted; delete nothing")
    batch_size: int = Field(default=100, ge=1, le=MAX_BATCH, description="Runs deleted per batch")
    finished_before: AwareDatetime | None = Field(
        default=None,
        description="Instead of older_than_days: delete finished runs that ended before this moment (not future)",
    )

    @field_validator("finished_before")
    @classmethod
    def _not_future(cls, value: datetime | None) -> datetime | None:
        if value is not None and value > datetime.now(UTC):
            raise ValueError("finished_before is in the future")
        return value

    def cutoff(self, now: datetime) -> datetime:
        return self.finished_before or now - timedelta(days=self.older_than_days)


@flow(name="orchestrator-hygiene", log_prints=False)
def orchestrator_hygiene(params: HygieneRun | None = None) -> dict[str, Any]:
    """Delete (or count, in a dry run) finished request flow runs older than the cutoff; returns the counts."""
    params = params or HygieneRun()
    services = connect()
    now = datetime.now(UTC)
    cutoff = params.cutoff(now)
    run_id = str(flow_run.get_id() or f"local-{now:%Y%m%dT%H%M%S%f}")

    runs: dict[str, int] = {}
    batches = 0
    for flow_name in REQUEST_FLOWS:
        if params.dry_run:
            runs[flow_name] = count_finished_runs(flow_name, cutoff)
            continue
        deleted = 0
        seen: set[UUID] = set()
        while batch := finished_run_ids(flow_name, cutoff, params.batch_size):
            if seen.intersection(batch):  # deleted runs listed again: stop rather than loop forever
                raise RuntimeError(f"{flow_name}: flow runs still listed after deletion; check the Prefect API")
            seen.update(batch)
            deleted += delete_runs(batch)
            batches += 1
        runs[flow_name] = deleted

    report = {
        "dry_run": params.dry_run,
        "cutoff": cutoff.isoformat(),
        "older_than_days": None if params.finished_before else params.older_than_days,
        "runs": runs,
        "total": sum(runs.values()),
        "batches": batches,
    }
    record_hygiene_run(services, run_id, report)
    get_run_logger().info(
        "%s %d finished request flow run(s) that ended before %s (%s)",
        "would delete" if params.dry_run else "deleted",
        report["total"],
        report["cutoff"],
        ", ".join(f"{name}: {count}" for name, count in runs.items()),
    )
    return report

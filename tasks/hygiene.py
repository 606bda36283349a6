"""Orchestrator hygiene steps: count and delete finished request flow runs in Prefect, record the counts.

The one place personal data enters Prefect is a request's intake parameter (the email a person types), stored with
its flow run. Deleting the run removes it, with the run's states, task runs and run inputs (cascaded by Prefect's
database) and its logs: Prefect 3.9.1's DELETE /flow_runs/{id} queues a background job that deletes the run's
logs (there is no log-delete endpoint; tests/test_hygiene.py checks that they go). Artifacts (request
summaries, no personal data) and events (expired by Prefect's event retention) are not touched.

Only runs of the request flows, in a final state (completed, failed, cancelled, crashed) with an end time before
the cutoff, are selected: never running, paused, suspended, scheduled or pending ones. Deleted in batches, "already
gone" counts as done, so a rerun converges.
"""

from __future__ import annotations

import contextlib
from datetime import datetime
from typing import Any
from uuid import UUID

from prefect import task
from prefect.cache_policies import NO_CACHE

from privacy_ops.lifecycle import audit
from privacy_ops.services import Services

REQUEST_FLOWS = ("access-request", "erasure-request")
MAX_BATCH = 200  # the most runs Prefect's API returns per read (PREFECT_SERVER_API_DEFAULT_LIMIT)


def _filters(flow_name: str, cutoff: datetime) -> dict[str, Any]:
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterEndTime,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    finished = [StateType.COMPLETED, StateType.FAILED, StateType.CANCELLED, StateType.CRASHED]
    return {
        "flow_filter": FlowFilter(name=FlowFilterName(any_=[flow_name])),
        "flow_run_filter": FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=finished)),
            # model_validate: pydantic turns the datetime into Prefect's DateTime type (pendulum on 3.11).
            end_time=FlowRunFilterEndTime.model_validate({"before_": cutoff}),
        ),
    }


@task(cache_policy=NO_CACHE, persist_result=False, retries=2, retry_delay_seconds=5)
def count_finished_runs(flow_name: str, cutoff: datetime) -> int:
    """How many finished runs of the flow ended before the cutoff (what a real run would delete)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.count_flow_runs(**_filters(flow_name, cutoff))


@task(cache_policy=NO_CACHE, persist_result=False, retries=2, retry_delay_seconds=5)
def finished_run_ids(flow_name: str, cutoff: datetime, limit: int) -> list[UUID]:
    """The next batch of finished runs of the flow that ended before the cutoff (ids only)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(**_filters(flow_name, cutoff), sort=FlowRunSort.ID_DESC, limit=limit)
    return [run.id for run in runs]


@task(cache_policy=NO_CACHE, persist_result=False, retries=2, retry_delay_seconds=5)
def delete_runs(run_ids: list[UUID]) -> int:
    """Delete one batch of flow runs (their logs follow in Prefect's background job); returns how many went.

    A run already gone (a concurrent or earlier attempt deleted it) counts as deleted: the goal is reached.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        for run_id in run_ids:
            with contextlib.suppress(ObjectNotFound):
                client.delete_flow_run(run_id)
    return len(run_ids)


@task(cache_policy=NO_CACHE, persist_result=False, retries=2, retry_delay_seconds=5)
def record_hygiene_run(services: Services, run_id: str, report: dict[str, Any]) -> None:
    """What the run did, counts only, in the audit log (once per hygiene run id; dry runs are recorded too)."""
    with services.engine.begin() as connection:
        audit.record(
            connection,
            step="orchestrator_hygiene",
            outcome="dry_run" if report["dry_run"] else "deleted",
            request_id=None,
            subject_hash=None,
            details=report,
            idempotency_key=f"orchestrator-hygiene:{run_id}",
        )

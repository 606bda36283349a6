"""Steps of restriction (GDPR art. 18), objection (art. 21) and the CCPA opt-out: act, then prove it.

Each act step changes CellCMS and writes its audit entry in one transaction, keyed per request: a rerun returns
what was recorded instead of acting again (the functions in privacy_ops/processing.py are idempotent as well).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Connection

from privacy_ops import checks, processing
from privacy_ops.lifecycle import audit, requests
from privacy_ops.lifecycle.schema import audit_log
from privacy_ops.services import Services
from tasks.checks import record_verdict
from tasks.step import step


def _act_once(
    services: Services,
    request_id: str,
    outcome: str,
    act: Callable[[Connection], processing.Change],
    **recorded: str,
) -> dict[str, Any]:
    """Run `act` and audit its counts (and `recorded`) in one transaction, once per request and outcome."""
    key = f"{request_id}:act:{outcome}"
    with services.engine.begin() as connection:
        done = connection.execute(
            select(audit_log.c.details).where(audit_log.c.idempotency_key == key)
        ).scalar_one_or_none()
        if done is not None:
            return dict(done)
        request = requests.get_request(connection, request_id)
        details = {"store": "postgres", "tables": act(connection).counts, **recorded}
        audit.record(
            connection,
            step="act",
            outcome=outcome,
            request_id=request_id,
            subject_hash=request.subject_hash,
            details=details,
            idempotency_key=key,
        )
        requests.merge_outcome(connection, request_id, {outcome: details["tables"]})
    return details


@step()
def restrict_processing(services: Services, request_id: str, account_ids: list[int]) -> dict[str, Any]:
    """Mark the accounts restricted; take them out of every restrictable processing output."""
    return _act_once(
        services,
        request_id,
        "processing_restricted",
        lambda connection: processing.restrict(connection, services.datamap, account_ids, services.now()),
    )


@step()
def lift_restriction(
    services: Services, request_id: str, account_ids: list[int], lifted_by: str
) -> dict[str, Any]:
    """Clear the restriction marker (after the person was told)."""
    return _act_once(
        services,
        request_id,
        "restriction_lifted",
        lambda connection: processing.lift_restriction(connection, services.datamap, account_ids),
        lifted_by=lifted_by,
    )


@step()
def object_to_processing(
    services: Services, request_id: str, account_ids: list[int], purposes: list[str], source: str
) -> dict[str, Any]:
    """Record the objections and stop the processing: data collected for those purposes only is deleted."""
    named = processing.purposes_named(services.datamap, purposes)
    return _act_once(
        services,
        request_id,
        "objection_recorded",
        lambda connection: processing.object_to(
            connection, services.datamap, account_ids, named, source=source, now=services.now()
        ),
        source=source,
    )


@step(retries=0)
def check_processing(
    services: Services, request_id: str, account_ids: list[int], *, restricted: bool, objected: list[str]
) -> dict[str, Any]:
    """Great Expectations: the accounts appear in no output of what they restricted or objected to."""
    leftovers = processing.leftovers(services.datamap, account_ids, restricted=restricted, objected=objected)
    result = checks.processing_checks(services.settings.database_url.get_secret_value(), leftovers)
    return record_verdict(services, request_id, "processing", result)


def processing_summary(act: dict[str, Any]) -> list[dict[str, Any]]:
    """What the completion email says was done: rows changed per table and action."""
    return [
        {"store": "CellCMS database", "action": f"{action.replace('_', ' ')} in {table}", "count": count}
        for table, actions in act["tables"].items()
        for action, count in actions.items()
        if count
    ]

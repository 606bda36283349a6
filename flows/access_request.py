"""Right of access (GDPR art. 15 and 20, CCPA right to know): a copy of every mapped record, delivered by link.

locate -> verify identity -> act (build the package) -> check (Great Expectations) -> notify -> record.
"""

from __future__ import annotations

from prefect import flow

from flows.lifecycle import REQUEST_FLOW, answer_duplicate, answer_no_data, deny, start, verify_identity
from flows.parameters import SubjectIntake
from privacy_ops.lifecycle.requests import Right, Status
from privacy_ops.services import services as connect
from tasks.access import build_access_package
from tasks.checks import check_access_package
from tasks.lifecycle import (
    contact_address,
    finish_request,
    notify_subject,
    publish_request_artifact,
)

RIGHT = Right.access


@flow(name="access-request", **REQUEST_FLOW)
def access_request(
    intake: SubjectIntake | None = None, resume_request_id: str | None = None, code_lifetime_hours: float = 24
) -> str:
    """Answer an access request: returns the request's final status."""
    services = connect()
    started = start(services, RIGHT, intake, resume_request_id)
    request_id, located = started.request_id, started.located
    if not located.found:
        return answer_no_data(services, request_id, RIGHT, intake)
    if started.duplicate_of is not None:
        return answer_duplicate(services, started, RIGHT)
    to = contact_address(services, located.account_ids)
    notify_subject(services, request_id, "acknowledgement", to, {"right": RIGHT.value, "due_at": started.due_at})
    if not verify_identity(services, request_id, to, code_lifetime_hours):
        return deny(services, request_id, RIGHT, to)

    package = build_access_package(services, request_id, located.account_ids)
    verdict = check_access_package(services, request_id, package, located)
    notify_subject(
        services,
        request_id,
        "completion",
        to,
        {
            "right": RIGHT.value,
            "summary": [
                {"store": "CellCMS database", "action": "copied", "count": sum(package.rows_per_table.values())},
                {"store": "Files", "action": "copied", "count": package.files},
                {"store": "Billing (Stripe)", "action": "copied", "count": package.stripe_customers},
            ],
            "export_url": package.url,
            "export_expires_at": package.expires_at,
        },
    )
    outcome = {"access_package": package.summary(), "checks": verdict}
    finish_request(services, request_id, Status.completed, outcome)
    publish_request_artifact(services, request_id)
    return Status.completed.value

"""Right to data portability (GDPR art. 20): the data the person provided, in formats another CMS can import.

locate -> verify identity -> act (build the package: portable tables as JSON + CSV, asset files as-is, a manifest)
-> check (Great Expectations, on the package read back) -> notify (an expiring link) -> record. Unlike the access
package it holds no observed data (usage, devices, logs) and no rows other accounts provided.
"""

from __future__ import annotations

from prefect import flow

from flows.lifecycle import REQUEST_FLOW, answer_duplicate, answer_no_data, deny, start, verify_identity
from flows.parameters import SubjectIntake
from privacy_ops.lifecycle.requests import Right, Status
from privacy_ops.services import services as connect
from tasks.lifecycle import contact_address, finish_request, notify_subject, publish_request_artifact
from tasks.portability import build_portability_package, check_portability_package, completion_summary

RIGHT = Right.portability


@flow(name="portability-request", **REQUEST_FLOW)
def portability_request(
    intake: SubjectIntake | None = None, resume_request_id: str | None = None, code_lifetime_hours: float = 24
) -> str:
    """Answer a portability request: returns the request's final status."""
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

    package = build_portability_package(services, request_id, located.account_ids)
    verdict = check_portability_package(services, request_id, package, located)
    notify_subject(
        services,
        request_id,
        "completion",
        to,
        {
            "right": RIGHT.value,
            "summary": completion_summary(package),
            "export_url": package.url,
            "export_expires_at": package.expires_at,
        },
    )
    finish_request(
        services, request_id, Status.completed, {"portability_package": package.summary(), "checks": verdict}
    )
    publish_request_artifact(services, request_id)
    return Status.completed.value

"""Right to object (GDPR art. 21) to named purposes of processing (analytics, marketing, product research).

locate -> check the purposes against the data map -> verify identity -> act (record the objection in CellCMS,
delete the data collected for those purposes only, take the account out of their outputs, switch the processing
off, withdraw the matching cookie consent) -> check (Great Expectations) -> notify -> record.
"""

from __future__ import annotations

from prefect import flow

from flows.lifecycle import REQUEST_FLOW, answer_duplicate, answer_no_data, deny, reject, start, verify_identity
from flows.parameters import Objection, SubjectIntake
from privacy_ops.lifecycle.requests import Right, Status
from privacy_ops.processing import UnknownPurpose, purposes_named
from privacy_ops.services import services as connect
from tasks.lifecycle import contact_address, finish_request, notify_subject, publish_request_artifact
from tasks.processing import check_processing, object_to_processing, processing_summary

RIGHT = Right.objection


@flow(name="objection-request", **REQUEST_FLOW)
def objection_request(
    intake: SubjectIntake | None = None,
    objection: Objection | None = None,
    resume_request_id: str | None = None,
    code_lifetime_hours: float = 24,
) -> str:
    """Carry out an objection: returns the request's final status."""
    services = connect()
    started = start(services, RIGHT, intake, resume_request_id)
    request_id, accounts = started.request_id, started.located.account_ids
    if not started.located.found:
        return answer_no_data(services, request_id, RIGHT, intake)
    if started.duplicate_of is not None:
        return answer_duplicate(services, started, RIGHT)
    purposes = objection.purposes if objection is not None else []
    try:
        purposes_named(services.datamap, purposes)
    except UnknownPurpose:
        known = ", ".join(services.datamap.processing.purposes if services.datamap.processing else [])
        return reject(services, request_id, RIGHT, accounts, f"we can stop only these uses of your data: {known}")
    to = contact_address(services, accounts)
    notify_subject(services, request_id, "acknowledgement", to, {"right": RIGHT.value, "due_at": started.due_at})
    if not verify_identity(services, request_id, to, code_lifetime_hours):
        return deny(services, request_id, RIGHT, to)

    objected = object_to_processing(services, request_id, accounts, purposes, "request")
    verdict = check_processing(services, request_id, accounts, restricted=False, objected=purposes)
    summary = [
        *processing_summary(objected),
        {"store": "CellCMS", "action": f"stopped: {', '.join(purposes)}"},
    ]
    notify_subject(services, request_id, "completion", to, {"right": RIGHT.value, "summary": summary})
    finish_request(services, request_id, Status.completed, {"purposes": purposes, "checks": verdict})
    publish_request_artifact(services, request_id)
    return Status.completed.value

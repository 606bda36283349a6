"""Right to restriction of processing (GDPR art. 18): keep the data, stop using it.

locate -> verify identity -> act (mark the account restricted in CellCMS; take it out of every restrictable
processing output the data map lists) -> check (Great Expectations: the account is in none of them) -> notify ->
record. Lifting it is flows/lift_restriction.py, which tells the person first.
"""

from __future__ import annotations

from prefect import flow

from flows.lifecycle import REQUEST_FLOW, answer_duplicate, answer_no_data, deny, start, verify_identity
from flows.parameters import SubjectIntake
from privacy_ops.lifecycle.requests import Right, Status
from privacy_ops.services import services as connect
from tasks.lifecycle import contact_address, finish_request, notify_subject, publish_request_artifact
from tasks.processing import check_processing, processing_summary, restrict_processing

RIGHT = Right.restriction


@flow(name="restriction-request", **REQUEST_FLOW)
def restriction_request(
    intake: SubjectIntake | None = None, resume_request_id: str | None = None, code_lifetime_hours: float = 24
) -> str:
    """Carry out a restriction request: returns the request's final status."""
    services = connect()
    started = start(services, RIGHT, intake, resume_request_id)
    request_id, accounts = started.request_id, started.located.account_ids
    if not started.located.found:
        return answer_no_data(services, request_id, RIGHT, intake)
    if started.duplicate_of is not None:
        return answer_duplicate(services, started, RIGHT)
    to = contact_address(services, accounts)
    notify_subject(services, request_id, "acknowledgement", to, {"right": RIGHT.value, "due_at": started.due_at})
    if not verify_identity(services, request_id, to, code_lifetime_hours):
        return deny(services, request_id, RIGHT, to)

    restricted = restrict_processing(services, request_id, accounts)
    verdict = check_processing(services, request_id, accounts, restricted=True, objected=[])
    summary = [
        *processing_summary(restricted),
        {
            "store": "CellCMS",
            "action": "processing restricted",
            "note": "we keep your data but use it for nothing but storage until the restriction is lifted, "
            "and we will tell you before we lift it",
        },
    ]
    notify_subject(services, request_id, "completion", to, {"right": RIGHT.value, "summary": summary})
    finish_request(services, request_id, Status.completed, {"checks": verdict})
    publish_request_artifact(services, request_id)
    return Status.completed.value

"""CCPA right to opt out of the sale or sharing of personal information (and the Global Privacy Control signal).

CellCMS sells no personal information; the opt-out is still recorded (as an objection to `sale_or_sharing`), every
sharing flag the data map lists is switched off and checked, and the person is told. The CCPA does not let a
business require identity verification for an opt-out (Cal. Code Regs. tit. 11 § 7026), so none is asked.
locate -> act -> check (Great Expectations) -> notify -> record.
"""

from __future__ import annotations

from prefect import flow

from flows.lifecycle import REQUEST_FLOW, answer_duplicate, answer_no_data, start
from flows.parameters import SubjectIntake
from privacy_ops.lifecycle.requests import Right, Status
from privacy_ops.services import services as connect
from tasks.lifecycle import contact_address, finish_request, notify_subject, publish_request_artifact
from tasks.processing import check_processing, object_to_processing, processing_summary

RIGHT = Right.opt_out
PURPOSE = "sale_or_sharing"
NO_SALE = "CellCMS does not sell personal information, and shares it only with the services that run the platform"


@flow(name="opt-out-request", **REQUEST_FLOW)
def opt_out_request(
    intake: SubjectIntake | None = None, global_privacy_control: bool = False, resume_request_id: str | None = None
) -> str:
    """Record an opt-out of sale/sharing (a GPC signal counts as one): returns the request's final status."""
    services = connect()
    started = start(services, RIGHT, intake, resume_request_id)
    request_id, accounts = started.request_id, started.located.account_ids
    if not started.located.found:
        return answer_no_data(services, request_id, RIGHT, intake)
    if started.duplicate_of is not None:
        return answer_duplicate(services, started, RIGHT)
    source = "global_privacy_control" if global_privacy_control else "request"
    opted_out = object_to_processing(services, request_id, accounts, [PURPOSE], source)
    verdict = check_processing(services, request_id, accounts, restricted=False, objected=[PURPOSE])
    summary = [
        *processing_summary(opted_out),
        {"store": "CellCMS", "action": "opt-out of sale and sharing recorded", "note": NO_SALE},
    ]
    notify_subject(
        services,
        request_id,
        "completion",
        contact_address(services, accounts),
        {"right": RIGHT.value, "summary": summary},
    )
    finish_request(services, request_id, Status.completed, {"source": source, "checks": verdict})
    publish_request_artifact(services, request_id)
    return Status.completed.value

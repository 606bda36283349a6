"""Right to erasure (GDPR art. 17, CCPA right to delete): remove everything the law lets us remove, prove it.

locate -> verify identity -> act (PostgreSQL, S3, Stripe per the data map) -> check (Great Expectations: none of
the person's identifiers left anywhere) -> notify -> record. Billing records required by tax law stay,
pseudonymised, with their purge date; content shared with collaborators stays with the author anonymised.
"""

from __future__ import annotations

from prefect import flow

from flows.lifecycle import REQUEST_FLOW, answer_duplicate, answer_no_data, deny, start, verify_identity
from flows.parameters import SubjectIntake
from privacy_ops.lifecycle.requests import Right, Status
from privacy_ops.services import services as connect
from tasks.checks import check_erasure
from tasks.erasure import (
    erase_postgres,
    erase_s3,
    erase_stripe,
    erasure_summary,
    forget_snapshot,
    snapshot_subject,
)
from tasks.lifecycle import finish_request, notify_subject, publish_request_artifact

RIGHT = Right.erasure


@flow(name="erasure-request", **REQUEST_FLOW)
def erasure_request(
    intake: SubjectIntake | None = None, resume_request_id: str | None = None, code_lifetime_hours: float = 24
) -> str:
    """Carry out an erasure request: returns the request's final status."""
    services = connect()
    started = start(services, RIGHT, intake, resume_request_id)
    request_id, located = started.request_id, started.located
    if not located.found:
        return answer_no_data(services, request_id, RIGHT, intake)
    if started.duplicate_of is not None:
        return answer_duplicate(services, started, RIGHT)
    snapshot = snapshot_subject(services, request_id, located.account_ids)
    to = snapshot.contact
    notify_subject(services, request_id, "acknowledgement", to, {"right": RIGHT.value, "due_at": started.due_at})
    if not verify_identity(services, request_id, to, code_lifetime_hours):
        forget_snapshot(services, request_id)
        return deny(services, request_id, RIGHT, to)

    postgres = erase_postgres(services, request_id, snapshot)
    s3 = erase_s3(services, request_id, snapshot)
    stripe = erase_stripe(services, request_id, snapshot)
    verdict = check_erasure(
        services, request_id, snapshot
    )  # raises (the run fails, not complete) if anything is left
    notify_subject(
        services,
        request_id,
        "completion",
        to,
        {"right": RIGHT.value, "summary": erasure_summary(postgres, s3, stripe)},
    )
    outcome = {"erasure": {"postgres": postgres, "s3": s3, "stripe": stripe}, "checks": verdict}
    finish_request(services, request_id, Status.completed, outcome)
    forget_snapshot(services, request_id)
    publish_request_artifact(services, request_id)
    return Status.completed.value

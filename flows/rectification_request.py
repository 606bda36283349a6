"""Right to rectification (GDPR art. 16): correct named fields everywhere the data map says the value lives.

locate -> review the corrections against the map (refused and unknown fields are answered, with the reason) ->
verify identity -> plan (the values they replace) -> confirm a new email address with a code sent to it -> act
(PostgreSQL: value of record and copies holding the same old value, in one transaction; the Stripe customer) ->
notify (the answer to the new address; a notice of the change to the old one) -> record.

Nothing changes unless every check passed: a request whose fields are all refused, whose identity or new address
is not confirmed, is answered and closed with no change anywhere.
"""

from __future__ import annotations

from datetime import datetime

from prefect import flow
from prefect.exceptions import FlowPauseTimeout
from prefect.input import RunInput
from pydantic import Field

from flows.lifecycle import (
    CODE_PATTERN,
    REQUEST_FLOW,
    answer_duplicate,
    answer_no_data,
    deny,
    start,
    verify_identity,
    wait_for,
)
from flows.parameters import SubjectIntake
from privacy_ops.lifecycle.requests import FINAL, Right, Status
from privacy_ops.lifecycle.verification import VerificationStatus
from privacy_ops.pii import Pii
from privacy_ops.rectification import Plan, RectificationInput, Refusal
from privacy_ops.services import Services
from privacy_ops.services import services as connect
from tasks.lifecycle import finish_request, load_request, notify_subject, publish_request_artifact
from tasks.rectification import (
    EMAIL_CHANGED,
    check_new_email_code,
    expire_new_email_code,
    forget_corrections,
    new_email_state,
    plan_changes,
    rectification_summary,
    rectify_postgres,
    rectify_stripe,
    refusal_reason,
    review_corrections,
    send_new_email_code,
)

RIGHT = Right.rectification


class NewEmailCode(RunInput):
    """What the resume form asks for while a request waits for its new email address to be confirmed."""

    code: str = Field(description="The 6-digit code emailed to the NEW address", pattern=CODE_PATTERN)


@flow(name="rectification-request", **REQUEST_FLOW)
def rectification_request(
    intake: SubjectIntake | None = None,
    corrections: RectificationInput | None = None,
    resume_request_id: str | None = None,
    code_lifetime_hours: float = 24,
) -> str:
    """Carry out a rectification request: returns the request's final status."""
    services = connect()
    started = start(services, RIGHT, intake, resume_request_id)
    request_id, located = started.request_id, started.located
    if not located.found:
        return answer_no_data(services, request_id, RIGHT, intake)
    if started.duplicate_of is not None:
        return answer_duplicate(services, started, RIGHT)
    finished = _already_finished(services, request_id)
    if finished is not None:
        return finished
    reviewed = review_corrections(services, request_id, located.account_ids, corrections)
    to = reviewed.contact
    if not reviewed.accepted:
        return refuse(services, request_id, to, reviewed.refused)
    notify_subject(services, request_id, "acknowledgement", to, {"right": RIGHT.value, "due_at": started.due_at})
    if not verify_identity(services, request_id, to, code_lifetime_hours):
        forget_corrections(services, request_id)
        return deny(services, request_id, RIGHT, to)

    planned = plan_changes(services, request_id, located.account_ids)
    if not planned.changes:
        return nothing_to_change(services, request_id, to, planned)
    if planned.new_email is not None and not verify_new_email(
        services, request_id, planned.new_email, code_lifetime_hours
    ):
        return deny_new_email(services, request_id, to)

    postgres = rectify_postgres(services, request_id, planned)
    stripe = rectify_stripe(services, request_id, planned)
    summary = rectification_summary(planned, postgres, stripe)
    notify_subject(
        services, request_id, "completion", planned.new_email or to, {"right": RIGHT.value, "summary": summary}
    )
    if planned.new_email is not None:
        notify_subject(services, request_id, EMAIL_CHANGED, to, {"right": RIGHT.value})
    finish_request(services, request_id, Status.completed, _outcome(planned, postgres, stripe))
    forget_corrections(services, request_id)
    publish_request_artifact(services, request_id)
    return Status.completed.value


def _already_finished(services: Services, request_id: str) -> str | None:
    """A rerun of a request that already ended does nothing again (its corrections are forgotten by then)."""
    request = load_request(services, request_id)
    if request.right != RIGHT:
        raise ValueError(f"request {request_id} is a {request.right.value} request, not a rectification")
    return request.status.value if request.status in FINAL else None


def _outcome(planned: Plan, postgres: dict[str, object], stripe: dict[str, object]) -> dict[str, object]:
    """The request's outcome: field names and counts per store (hashes stay in the audit entry of the act)."""
    return {
        "rectification": {
            "corrected": planned.corrected,
            "unchanged": list(planned.unchanged),
            "refused": {refusal.field: refusal.reason for refusal in planned.refused},
            "email_changed": planned.new_email is not None,
            "postgres": postgres,
            "stripe": stripe,
        }
    }


def refuse(services: Services, request_id: str, to: Pii, refused: tuple[Refusal, ...]) -> str:
    """No field asked for can be corrected (refused by the map, unknown): say why for each, change nothing."""
    notify_subject(services, request_id, "denial", to, {"right": RIGHT.value, "reason": refusal_reason(refused)})
    finish_request(
        services,
        request_id,
        Status.denied,
        {"rectification": {"corrected": [], "refused": {r.field: r.reason for r in refused}}},
    )
    forget_corrections(services, request_id)
    publish_request_artifact(services, request_id)
    return Status.denied.value


def nothing_to_change(services: Services, request_id: str, to: Pii, planned: Plan) -> str:
    """After verification, every field turned out already correct, not held or refused: answer, change nothing."""
    if planned.unchanged:
        summary = rectification_summary(planned, {"rows": 0}, {})
        notify_subject(services, request_id, "completion", to, {"right": RIGHT.value, "summary": summary})
        status = Status.completed
    else:
        reason = refusal_reason(planned.refused)
        notify_subject(services, request_id, "denial", to, {"right": RIGHT.value, "reason": reason})
        status = Status.denied
    finish_request(services, request_id, status, _outcome(planned, {"rows": 0}, {}))
    forget_corrections(services, request_id)
    publish_request_artifact(services, request_id)
    return status.value


NEW_EMAIL_DENIAL = {
    VerificationStatus.denied: "the new email address was not confirmed: the code sent to it was entered wrongly "
    "too many times, so nothing was changed",
    VerificationStatus.expired: "the new email address was not confirmed: the code sent to it expired before it "
    "was entered, so nothing was changed",
}


def verify_new_email(services: Services, request_id: str, to: Pii, code_lifetime_hours: float) -> bool:
    """Email a code to the NEW address and wait until it is entered: the address must be the person's before it
    replaces the old one. True once confirmed; False after too many wrong codes or when the code expired."""
    send_new_email_code(services, request_id, to, code_lifetime_hours)
    while True:
        state = new_email_state(services, request_id)
        if state.status == VerificationStatus.verified:
            return True
        if state.status != VerificationStatus.pending:
            return False
        try:
            answer = wait_for(
                NewEmailCode,
                key=f"new-email-code-{state.attempts}",
                timeout=_seconds_left(services, state.expires_at),
            )
        except FlowPauseTimeout:
            expire_new_email_code(services, request_id)
            return False
        check_new_email_code(services, request_id, answer.code.strip(), state.attempts)


def _seconds_left(services: Services, expires_at: datetime | None) -> int:
    if expires_at is None:
        return 24 * 3600
    return max(1, int((expires_at - services.now()).total_seconds()))


def deny_new_email(services: Services, request_id: str, to: Pii) -> str:
    """The new address was not confirmed: tell the person at the address on file, change nothing, close."""
    state = new_email_state(services, request_id)
    reason = NEW_EMAIL_DENIAL[state.status]
    notify_subject(services, request_id, "denial", to, {"right": RIGHT.value, "reason": reason})
    finish_request(services, request_id, Status.denied, {"new_email_verification": state.status.value})
    forget_corrections(services, request_id)
    publish_request_artifact(services, request_id)
    return Status.denied.value

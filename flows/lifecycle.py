"""The lifecycle every right shares, as flow-level sequences of tasks: intake + locate, then verify identity.

Not a flow itself: the functions run inside a right's flow (access_request.py, erasure_request.py, ...) so each
right reads like the policy: locate -> verify -> act -> notify -> record.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from prefect import get_run_logger
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run, suspend_flow_run
from prefect.input import RunInput
from prefect.runtime import deployment
from pydantic import Field

from flows.parameters import SubjectIntake
from privacy_ops.lifecycle.requests import Right, Status
from privacy_ops.lifecycle.verification import VerificationStatus
from privacy_ops.pii import Pii
from privacy_ops.results import EncryptedPickleSerializer
from privacy_ops.services import Services
from tasks.lifecycle import (
    Located,
    check_code,
    contact_address,
    expire_verification,
    finish_request,
    link_duplicate,
    load_request,
    locate_subject,
    notify_subject,
    open_request,
    publish_request_artifact,
    record_failure,
    send_verification_code,
    verification_state,
)

InputT = TypeVar("InputT", bound=RunInput)
CODE_PATTERN = r"^\s*\d{6}\s*$"

# Every request flow: results persisted encrypted (a retried run skips finished steps; a suspended run resumes at
# its wait), and a failed run marks its request failed in the audit log.
REQUEST_FLOW: dict[str, Any] = {
    "persist_result": True,
    "result_serializer": EncryptedPickleSerializer(),
    "on_failure": [record_failure],
}


class VerificationCode(RunInput):
    """What the resume form asks for while a request waits for identity verification."""

    code: str = Field(description="The 6-digit code emailed to the person's address on file", pattern=CODE_PATTERN)


@dataclass(frozen=True)
class Started:
    request_id: str
    located: Located
    due_at: datetime
    duplicate_of: str | None = None  # an open request of the same right for the same account: answered, not done


def start(
    services: Services, right: Right, intake: SubjectIntake | None, resume_request_id: str | None
) -> Started:
    """Intake (or resume an existing request) and locate the subject's data."""
    if resume_request_id is not None:
        request_id = load_request(services, resume_request_id).id
        located = locate_subject(services, request_id, None, None)
    else:
        if intake is None:
            raise ValueError("give an intake (email or account id) or a request id to resume")
        request_id = open_request(services, right, intake)
        email = Pii(intake.email) if intake.email is not None else None
        located = locate_subject(services, request_id, email, intake.account_id)
    get_run_logger().info("request %s: %d account(s) located", request_id, len(located.account_ids))
    duplicate_of = link_duplicate(services, request_id) if located.found else None
    return Started(request_id, located, load_request(services, request_id).due_at, duplicate_of)


def answer_duplicate(services: Services, started: Started, right: Right) -> str:
    """Tell the person (at the address on file) that the open request handles it; this one is closed, linked."""
    to = contact_address(services, started.located.account_ids)
    notify_subject(
        services,
        started.request_id,
        "duplicate",
        to,
        {"right": right.value, "open_request_id": started.duplicate_of},
    )
    publish_request_artifact(services, started.request_id)
    return Status.duplicate.value


def answer_no_data(services: Services, request_id: str, right: Right, intake: SubjectIntake | None) -> str:
    """An unknown identity is a normal outcome: answer 'no data held' (to the typed address, which reveals
    nothing) and close the request."""
    if intake is not None and intake.email is not None:
        notify_subject(services, request_id, "no_data_held", Pii(intake.email), {"right": right.value})
    finish_request(services, request_id, Status.no_data_held, {"accounts": 0})
    return Status.no_data_held.value


def verify_identity(services: Services, request_id: str, to: Pii, code_lifetime_hours: float) -> bool:
    """Email a one-time code to the address on file and wait (suspended when deployed) until it is entered.

    True once verified (by code, or by an operator with `privacy-ops verify --verified-by`); False when denied
    after too many wrong codes or when the code expired.
    """
    send_verification_code(services, request_id, to, code_lifetime_hours)
    while True:
        state = verification_state(services, request_id)
        if state.status == VerificationStatus.verified:
            return True
        if state.status != VerificationStatus.pending:
            return False
        try:
            answer = _wait_for_code(state.attempts, _seconds_left(services, state.expires_at))
        except FlowPauseTimeout:
            expire_verification(services, request_id)
            return False
        check_code(services, request_id, answer.code.strip(), state.attempts)


def _seconds_left(services: Services, expires_at: datetime | None) -> int:
    if expires_at is None:
        return 24 * 3600
    return max(1, int((expires_at - services.now()).total_seconds()))


DENIAL_REASONS = {
    VerificationStatus.denied: "the confirmation code was entered wrongly too many times",
    VerificationStatus.expired: "the confirmation code expired before it was entered",
}


def deny(services: Services, request_id: str, right: Right, to: Pii) -> str:
    """Identity could not be verified: tell the person why, and close the request as denied."""
    state = verification_state(services, request_id)
    notify_subject(
        services, request_id, "denial", to, {"right": right.value, "reason": DENIAL_REASONS[state.status]}
    )
    finish_request(services, request_id, Status.denied, {"verification": state.status.value})
    publish_request_artifact(services, request_id)
    return Status.denied.value


def reject(services: Services, request_id: str, right: Right, account_ids: list[int], reason: str) -> str:
    """The request asks for something we cannot do (an unknown purpose, say): tell the person why, at the address
    on file, and close it as denied before anything is changed. `reason` must hold no personal data."""
    to = contact_address(services, account_ids)
    notify_subject(services, request_id, "denial", to, {"right": right.value, "reason": reason})
    finish_request(services, request_id, Status.denied, {"rejected": reason})
    publish_request_artifact(services, request_id)
    return Status.denied.value


def _wait_for_code(attempt: int, timeout: int) -> VerificationCode:
    """The code for this attempt; the key is per attempt, so a resumed run gets back the code given for it."""
    return wait_for(VerificationCode, key=f"verification-code-{attempt}", timeout=timeout)


def wait_for(model: type[InputT], *, key: str, timeout: int) -> InputT:
    """Wait for a person's input: suspend a deployed run (it holds no worker while it waits), pause a local one
    (only deployed runs can be suspended). A resumed run gets back the input given under `key`."""
    key = re.sub(r"[^a-z0-9-]", "-", key.lower())  # Prefect accepts only lowercase letters, digits and dashes
    if deployment.id:
        return suspend_flow_run(wait_for_input=model, timeout=timeout, key=key)
    return pause_flow_run(wait_for_input=model, timeout=timeout, key=key, poll_interval=1)

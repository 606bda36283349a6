"""Restriction (and its lifting), objection, the CCPA opt-out, duplicate requests and non-discrimination, end to
end against the real local stack.
Each test judges the result by reading CellCMS's tables and the SMTP sink directly.
"""

from __future__ import annotations

from collections.abc import Callable
from email.message import EmailMessage
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy import Engine, text

from flows.lift_restriction import NotLiftable, lift_restriction
from flows.objection_request import objection_request
from flows.opt_out_request import opt_out_request
from flows.parameters import LiftRestriction, Objection, SubjectIntake
from flows.restriction_request import restriction_request
from privacy_ops.lifecycle import audit
from privacy_ops.lifecycle.requests import RequestNotFound, Status
from privacy_ops.runner import (
    code_from_mail,
    final_status,
    find_new_request,
    start_flow,
    submit_code,
    wait_until_awaiting_code,
)
from privacy_ops.settings import Settings
from tests.conftest import wait_for

WAIT = 300
Mail = Callable[[], list[EmailMessage]]

# Ordinary seeded accounts (1..10 carry the hard cases, 21..24 the retention cases), one per test.
RESTRICTED, OBJECTING, REJECTED, OPTING_OUT, TWICE = 12, 13, 14, 15, 16


def _run(engine: Engine, read_mail: Mail, flow_fn: Any, right: str, *, verify: bool = True, **params: Any) -> str:
    """Start a request flow, enter the emailed code when it asks for one, wait for the end; the request id."""
    handle = start_flow(flow_fn, **params)
    request_id = find_new_request(engine, right, handle.started_at)
    if verify:
        wait_until_awaiting_code(engine, request_id)
        code = wait_for(lambda: code_from_mail(read_mail(), request_id), 60, f"the code of {request_id}")
        submit_code(engine, request_id, code)
    handle.wait(WAIT)
    return request_id


def _subjects(read_mail: Mail, request_id: str) -> list[str]:
    return [str(m["Subject"]) for m in read_mail() if request_id in str(m["Subject"])]


def _count(engine: Engine, query: str, **params: Any) -> int:
    with engine.connect() as connection:
        return int(connection.execute(text(query), params).scalar_one())


def _audit_outcomes(engine: Engine, request_id: str) -> list[str]:
    with engine.connect() as connection:
        return list(
            connection.execute(
                text("SELECT outcome FROM privacy_ops.audit_log WHERE request_id = :r ORDER BY seq"),
                {"r": request_id},
            ).scalars()
        )


def _chain_verifies(engine: Engine) -> None:
    with engine.connect() as connection:
        chain = audit.verify(connection)
    assert chain.ok, chain.problems


def _give_processing_outputs(engine: Engine, account_id: int) -> None:
    """Make sure the account is in every processing output and has consented, so each test starts from data."""
    statements = [
        "INSERT INTO analytics_profiles VALUES (:a, 'regular', now()) ON CONFLICT DO NOTHING",
        "INSERT INTO marketing_audience_members VALUES ('newsletter', :a, now()) ON CONFLICT DO NOTHING",
        "UPDATE preferences SET marketing_emails = true WHERE account_id = :a",
        "UPDATE cookie_consents SET granted = true WHERE account_id = :a AND category = 'analytics'",
        "INSERT INTO page_views (account_id, path, viewed_at, session_id) VALUES (:a, '/x', now(), 's')",
    ]
    with engine.begin() as connection:
        for statement in statements:
            connection.execute(text(statement), {"a": account_id})


def _intake(account_id: int, regulation: str = "GDPR") -> SubjectIntake:
    return SubjectIntake.model_validate({"account_id": account_id, "regulation": regulation})


def test_restriction_keeps_data_out_of_processing_until_lifted_after_telling_the_person(
    cellcms: Settings, engine: Engine, read_mail: Mail
) -> None:
    account = RESTRICTED
    _give_processing_outputs(engine, account)
    page_views = _count(engine, "SELECT count(*) FROM page_views WHERE account_id = :a", a=account)
    others = _count(engine, "SELECT count(*) FROM analytics_profiles WHERE account_id <> :a", a=account)

    request_id = _run(engine, read_mail, restriction_request, "restriction", intake=_intake(account))

    request = final_status(engine, request_id)
    assert request.status == Status.completed
    assert _count(
        engine, "SELECT count(*) FROM accounts WHERE id = :a AND processing_restricted_at IS NOT NULL", a=account
    )
    assert _count(engine, "SELECT count(*) FROM analytics_profiles WHERE account_id = :a", a=account) == 0
    assert _count(engine, "SELECT count(*) FROM marketing_audience_members WHERE account_id = :a", a=account) == 0
    # Restricted, not erased: the data stays; other people's processing is untouched.
    assert _count(engine, "SELECT count(*) FROM page_views WHERE account_id = :a", a=account) == page_views
    assert _count(engine, "SELECT count(*) FROM analytics_profiles WHERE account_id <> :a", a=account) == others
    assert request.outcome["checks"]["success"] is True
    assert request.outcome["non_discrimination"] == {
        "verdict": "unchanged",
        "accounts_checked": 1,
        "changed_terms": [],
    }
    assert sorted(_subjects(read_mail, request_id)) == sorted(
        [
            f"We received your privacy request {request_id}",
            f"Your confirmation code for privacy request {request_id}",
            f"Your privacy request {request_id} is complete",
        ]
    )

    # A rerun of the request (e.g. from the CLI's --resume) restricts and mails nothing again.
    assert restriction_request(resume_request_id=request_id) == Status.completed.value
    assert len(_subjects(read_mail, request_id)) == 3
    assert _audit_outcomes(engine, request_id).count("processing_restricted") == 1

    lifting = LiftRestriction(
        restriction_request_id=request_id, reason="the accuracy check is finished", lifted_by="ops"
    )
    assert lift_restriction(lifting=lifting) == "lifted"
    assert lift_restriction(lifting=lifting) == "lifted"  # a rerun tells no one twice and lifts nothing twice

    assert _count(
        engine, "SELECT count(*) FROM accounts WHERE id = :a AND processing_restricted_at IS NULL", a=account
    )
    lifting_notices = [s for s in _subjects(read_mail, request_id) if "lifting the restriction" in s]
    assert len(lifting_notices) == 1
    outcomes = _audit_outcomes(engine, request_id)
    assert outcomes.count("processing_restricted") == 1 and outcomes.count("restriction_lifted") == 1
    # The person was told before the restriction was lifted.
    assert outcomes.index("restriction_lifting") < outcomes.index("restriction_lifted")
    _chain_verifies(engine)


def test_lifting_needs_a_known_request_id(cellcms: Settings) -> None:
    with pytest.raises(RequestNotFound):
        lift_restriction(
            lifting=LiftRestriction(restriction_request_id="req_0000000000", reason="x" * 10, lifted_by="ops")
        )
    with pytest.raises(ValidationError):
        LiftRestriction(restriction_request_id="not an id", reason="long enough reason", lifted_by="ops")


def test_objection_deletes_only_that_purposes_data_withdraws_consent_and_is_done_once(
    cellcms: Settings, engine: Engine, read_mail: Mail
) -> None:
    account = OBJECTING
    _give_processing_outputs(engine, account)
    others_views = _count(engine, "SELECT count(*) FROM page_views WHERE account_id <> :a", a=account)
    surveys = _count(engine, "SELECT count(*) FROM survey_responses WHERE account_id = :a", a=account)
    devices = _count(engine, "SELECT count(*) FROM devices WHERE account_id = :a", a=account)

    request_id = _run(
        engine,
        read_mail,
        objection_request,
        "objection",
        intake=_intake(account),
        objection=Objection(purposes=["analytics", "marketing"]),
    )

    request = final_status(engine, request_id)
    assert request.status == Status.completed
    for table in ("page_views", "feature_usage", "analytics_profiles", "marketing_audience_members"):
        assert _count(engine, f"SELECT count(*) FROM {table} WHERE account_id = :a", a=account) == 0, table
    assert _count(engine, "SELECT count(*) FROM page_views WHERE account_id <> :a", a=account) == others_views
    # Not objected to, or not collected for those purposes: kept.
    assert _count(engine, "SELECT count(*) FROM survey_responses WHERE account_id = :a", a=account) == surveys
    assert _count(engine, "SELECT count(*) FROM devices WHERE account_id = :a", a=account) == devices
    assert not _count(
        engine, "SELECT count(*) FROM preferences WHERE account_id = :a AND marketing_emails", a=account
    )
    assert not _count(
        engine,
        "SELECT count(*) FROM cookie_consents WHERE account_id = :a AND category = 'analytics' AND granted",
        a=account,
    )
    objections = _count(
        engine,
        "SELECT count(*) FROM processing_objections WHERE account_id = :a AND source = 'request'",
        a=account,
    )
    assert objections == 2

    # A rerun of the same request acts and mails nothing again.
    mails = len(_subjects(read_mail, request_id))
    assert objection_request(
        resume_request_id=request_id, objection=Objection(purposes=["analytics", "marketing"])
    )
    assert len(_subjects(read_mail, request_id)) == mails == 3
    assert _audit_outcomes(engine, request_id).count("objection_recorded") == 1
    _chain_verifies(engine)
    # Only a restriction can be lifted.
    with pytest.raises(NotLiftable):
        lift_restriction(
            lifting=LiftRestriction(restriction_request_id=request_id, reason="x" * 10, lifted_by="ops")
        )


def test_objection_to_an_unknown_purpose_is_answered_and_changes_nothing(
    cellcms: Settings, engine: Engine, read_mail: Mail
) -> None:
    account = REJECTED
    _give_processing_outputs(engine, account)
    views = _count(engine, "SELECT count(*) FROM page_views WHERE account_id = :a", a=account)

    request_id = _run(
        engine,
        read_mail,
        objection_request,
        "objection",
        verify=False,
        intake=_intake(account),
        objection=Objection(purposes=["analytics", "telepathy"]),
    )

    request = final_status(engine, request_id)
    assert request.status == Status.denied
    assert "analytics, marketing" in request.outcome["rejected"]
    assert _count(engine, "SELECT count(*) FROM page_views WHERE account_id = :a", a=account) == views
    assert _count(engine, "SELECT count(*) FROM processing_objections WHERE account_id = :a", a=account) == 0
    assert _subjects(read_mail, request_id) == [f"We could not carry out your privacy request {request_id}"]


def test_opt_out_honours_global_privacy_control_without_verification(
    cellcms: Settings, engine: Engine, read_mail: Mail
) -> None:
    account = OPTING_OUT
    with engine.begin() as connection:
        connection.execute(
            text("UPDATE preferences SET share_with_partners = true WHERE account_id = :a"), {"a": account}
        )

    request_id = _run(
        engine,
        read_mail,
        opt_out_request,
        "opt_out",
        verify=False,
        intake=_intake(account, "CCPA"),
        global_privacy_control=True,
    )

    request = final_status(engine, request_id)
    assert request.status == Status.completed
    assert request.outcome["source"] == "global_privacy_control"
    assert not _count(
        engine, "SELECT count(*) FROM preferences WHERE account_id = :a AND share_with_partners", a=account
    )
    assert _count(
        engine,
        "SELECT count(*) FROM processing_objections WHERE account_id = :a AND purpose = 'sale_or_sharing'"
        " AND source = 'global_privacy_control'",
        a=account,
    )
    completion = [m for m in read_mail() if str(m["Subject"]) == f"Your privacy request {request_id} is complete"]
    assert len(completion) == 1
    body = completion[0].get_body(preferencelist=("plain",))
    assert body is not None and "does not sell personal information" in body.get_content()
    assert not any("confirmation code" in s for s in _subjects(read_mail, request_id))
    # A rerun records and mails nothing again.
    assert opt_out_request(resume_request_id=request_id) == Status.completed.value
    assert _subjects(read_mail, request_id) == [f"Your privacy request {request_id} is complete"]
    assert _audit_outcomes(engine, request_id).count("objection_recorded") == 1


def test_a_second_request_for_the_same_right_while_one_is_open_is_linked_not_done(
    cellcms: Settings, engine: Engine, read_mail: Mail
) -> None:
    account = TWICE
    first = start_flow(restriction_request, intake=_intake(account))
    first_id = find_new_request(engine, "restriction", first.started_at)
    wait_until_awaiting_code(engine, first_id)

    second_id = _run(engine, read_mail, restriction_request, "restriction", verify=False, intake=_intake(account))

    second = final_status(engine, second_id)
    assert second.status == Status.duplicate
    assert second.outcome["duplicate_of"] == first_id
    assert _subjects(read_mail, second_id) == [f"Your privacy request {second_id} is already being handled"]
    assert "processing_restricted" not in _audit_outcomes(engine, second_id)

    # Meanwhile the account's plan changes: the non-discrimination check must notice and record it.
    with engine.begin() as connection:
        connection.execute(text("UPDATE accounts SET plan = plan || '-changed' WHERE id = :a"), {"a": account})
    submit_code(engine, first_id, wait_for(lambda: code_from_mail(read_mail(), first_id), 60, "the first code"))
    first.wait(WAIT)
    request = final_status(engine, first_id)
    assert request.status == Status.completed
    assert request.outcome["non_discrimination"] == {
        "verdict": "changed",
        "accounts_checked": 1,
        "changed_terms": ["plan"],
    }
    _chain_verifies(engine)

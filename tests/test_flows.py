"""End to end: the access and erasure flows against the real local stack (PostgreSQL, S3, Stripe, SMTP, Prefect).

Each test drives a flow the way an operator does: start it, read the code from the SMTP sink, resume the paused
run with it, and then looks at every store directly (not through the project's own checks) to judge the result.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any

import pytest
import stripe
from sqlalchemy import Engine, inspect, text

from cellcms_sandbox.hard_cases import demo_subjects
from flows.access_request import access_request
from flows.erasure_request import erasure_request
from flows.parameters import SubjectIntake
from privacy_ops import checks
from privacy_ops.lifecycle import audit
from privacy_ops.lifecycle.requests import Status
from privacy_ops.runner import RunnerError, code_from_mail, final_status, find_new_request, start_flow, submit_code
from privacy_ops.settings import Settings
from tests.conftest import SEEDED_ACCOUNTS

WAIT = 300


@dataclass(frozen=True)
class Person:
    account_id: int
    email: str
    full_name: str
    phone: str | None
    ips: set[str]
    stripe_customer_id: str | None


@pytest.fixture(scope="module")
def subjects(cellcms: Settings) -> list[int]:
    found = demo_subjects(cellcms.database_url.get_secret_value(), limit=None)
    assert len(found) >= 4, "the sandbox must hold at least four people with every hard case"
    return found


@pytest.fixture(scope="module")
def people(subjects: list[int], engine: Engine) -> list[Person]:
    """The people the tests act on, read before any test erases them."""
    return [person(engine, account_id) for account_id in subjects[:4]]


def person(engine: Engine, account_id: int) -> Person:
    with engine.connect() as connection:
        row = connection.execute(
            text("SELECT email, full_name, phone FROM accounts WHERE id = :id"), {"id": account_id}
        ).one()
        ips = set(
            connection.execute(
                text("SELECT DISTINCT host(ip_address) FROM access_logs WHERE account_id = :id"),
                {"id": account_id},
            ).scalars()
        )
        customer = connection.execute(
            text("SELECT stripe_customer_id FROM billing_profiles WHERE account_id = :id"), {"id": account_id}
        ).scalar_one_or_none()
    return Person(account_id, row.email, row.full_name, row.phone, ips, customer)


def messages_for(read_mail: Callable[[], list[EmailMessage]], request_id: str) -> list[str]:
    """Subjects of the emails sent for a request, one per message received."""
    return [str(m["Subject"]) for m in read_mail() if request_id in str(m["Subject"])]


def run_to_completion(
    flow_fn: Any,
    right: str,
    engine: Engine,
    read_mail: Callable[[], list[EmailMessage]],
    intake: SubjectIntake,
    codes: list[str] | None = None,
) -> str:
    """Start a request flow, answer its verification with `codes` (default: the emailed code), wait for it."""
    handle = start_flow(flow_fn, intake=intake, code_lifetime_hours=1)
    request_id = find_new_request(engine, right, handle.started_at)
    for code in [None] if codes is None else codes:
        if final_status(engine, request_id).status in (Status.denied, Status.completed, Status.no_data_held):
            break
        submit_code(engine, request_id, code or _emailed_code(read_mail, request_id))
    handle.wait(WAIT)
    return request_id


def _emailed_code(read_mail: Callable[[], list[EmailMessage]], request_id: str) -> str:
    import time

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        code = code_from_mail(read_mail(), request_id)
        if code:
            return code
        time.sleep(0.5)
    raise AssertionError(f"no verification code was emailed for {request_id}")


def text_values(engine: Engine) -> Iterator[tuple[str, str, str]]:
    """(table, column, value) of every non-null value of every column of the CellCMS schema, as text."""
    inspector = inspect(engine)
    with engine.connect() as connection:
        for table in inspector.get_table_names(schema="public"):
            for column in inspector.get_columns(table, schema="public"):
                name = column["name"]
                rendered = f'host("{name}")' if str(column["type"]).upper() == "INET" else f'"{name}"::text'
                for value in connection.execute(
                    text(f'SELECT {rendered} FROM "{table}" WHERE "{name}" IS NOT NULL')
                ).scalars():
                    yield table, name, value


def mentions(value: str, needle: str) -> bool:
    return re.search(rf"(?<![^\W_]){re.escape(needle)}(?![^\W_])", value, re.IGNORECASE) is not None


# ------------------------------------------------------------------------------------------------------- access


def test_access_package_holds_every_mapped_value_and_nobody_else(
    cellcms: Settings, people: list[Person], engine: Engine, s3: Any, read_mail: Callable[[], list[EmailMessage]]
) -> None:
    subject = people[0]
    others = [person(engine, i) for i in range(1, SEEDED_ACCOUNTS + 1) if i != subject.account_id]
    with engine.connect() as connection:
        planted = connection.execute(
            text(
                "SELECT m.body FROM support_messages m JOIN support_tickets t ON t.id = m.ticket_id "
                "WHERE t.account_id = :id AND m.body ILIKE '%' || :email || '%' LIMIT 1"
            ),
            {"id": subject.account_id, "email": subject.email},
        ).scalar_one()
        chained = (
            connection.execute(
                text(
                    "SELECT v.id FROM asset_versions v JOIN assets a ON a.id = v.asset_id "
                    "JOIN projects p ON p.id = a.project_id "
                    "WHERE p.owner_account_id = :id"
                ),
                {"id": subject.account_id},
            )
            .scalars()
            .all()
        )

    request_id = run_to_completion(
        access_request, "access", engine, read_mail, SubjectIntake(email=subject.email.upper())
    )

    request = final_status(engine, request_id)
    assert request.status == Status.completed
    package = request.outcome["access_package"]
    archive = zipfile.ZipFile(
        io.BytesIO(s3.get_object(Bucket=package["bucket"], Key=package["key"])["Body"].read())
    )
    contents = {name: archive.read(name).decode("utf-8", "replace") for name in archive.namelist()}
    everything = "\n".join(contents.values())
    accounts = json.loads(contents["account/accounts.json"])
    assert [a["email"] for a in accounts] == [subject.email]
    assert accounts[0]["full_name"] == subject.full_name
    assert accounts[0]["password_hash"] != "" and "$" not in accounts[0]["password_hash"]  # withheld
    messages = json.loads(contents["communications/support_messages.json"])
    assert planted in [m["body"] for m in messages]  # the free-text value, reached only through support_tickets
    versions = json.loads(contents["content/asset_versions.json"])
    assert sorted(v["id"] for v in versions) == sorted(chained)  # two hops: assets -> projects -> accounts
    for ip in subject.ips:
        assert ip in everything
    for other in others:
        assert other.email.lower() not in everything.lower(), "another person's email is in the package"
    assert "summary.html" in contents
    assert request.outcome["checks"]["success"] is True

    mail = messages_for(read_mail, request_id)
    assert sorted(mail) == sorted({*mail})  # each kind once
    assert len(mail) == 3  # acknowledgement, code, completion
    completion = next(
        m for m in read_mail() if request_id in str(m["Subject"]) and "complete" in str(m["Subject"])
    )
    body = completion.get_body(preferencelist=("plain",))
    assert body is not None and "X-Amz-Signature" in body.get_content()  # the presigned link


def test_unknown_identity_is_answered_no_data_held(
    cellcms: Settings, engine: Engine, read_mail: Callable[[], list[EmailMessage]]
) -> None:
    request_id = run_to_completion(
        access_request, "access", engine, read_mail, SubjectIntake(email="nobody-at-all@example.org"), codes=[]
    )
    assert final_status(engine, request_id).status == Status.no_data_held
    assert len(messages_for(read_mail, request_id)) == 1


# ------------------------------------------------------------------------------------------------------ erasure


def test_erasure_leaves_no_identifier_anywhere_but_keeps_invoices_and_shared_content(
    cellcms: Settings,
    people: list[Person],
    engine: Engine,
    s3: Any,
    stripe_client: stripe.StripeClient,
    read_mail: Callable[[], list[EmailMessage]],
) -> None:
    subject = people[1]
    assert subject.stripe_customer_id is not None
    with engine.connect() as connection:
        invoices = (
            connection.execute(text("SELECT id FROM invoices WHERE account_id = :id"), {"id": subject.account_id})
            .scalars()
            .all()
        )
        shared = (
            connection.execute(
                text(
                    "SELECT d.id FROM documents d JOIN projects p ON p.id = d.project_id "
                    "WHERE d.author_account_id = :id AND p.owner_account_id <> :id"
                ),
                {"id": subject.account_id},
            )
            .scalars()
            .all()
        )
    assert invoices and shared

    request_id = run_to_completion(
        erasure_request, "erasure", engine, read_mail, SubjectIntake(account_id=subject.account_id)
    )

    request = final_status(engine, request_id)
    assert request.status == Status.completed
    assert request.outcome["checks"]["success"] is True
    needles = [subject.email, subject.full_name, *subject.ips, subject.stripe_customer_id]
    if subject.phone:
        needles.append(subject.phone)
    leftovers = [(t, c) for t, c, v in text_values(engine) for n in needles if mentions(v, n)]
    assert leftovers == []
    versions = s3.list_object_versions(Bucket=cellcms.content_bucket, Prefix=f"accounts/{subject.account_id}/")
    assert not versions.get("Versions") and not versions.get("DeleteMarkers")
    assert stripe_client.v1.customers.list(params={"email": subject.email}).data == []
    with pytest.raises(stripe.InvalidRequestError):
        stripe_client.v1.customers.retrieve(subject.stripe_customer_id)
    with engine.connect() as connection:
        kept = connection.execute(
            text("SELECT id, account_id, billing_name, billing_email FROM invoices WHERE id = ANY(:ids)"),
            {"ids": invoices},
        ).all()
        purge = connection.execute(
            text(
                "SELECT count(*) FROM privacy_ops.retained_records WHERE request_id = :r AND purge_after > now()"
            ),
            {"r": request_id},
        ).scalar_one()
        documents = (
            connection.execute(
                text("SELECT author_account_id FROM documents WHERE id = ANY(:ids)"), {"ids": shared}
            )
            .scalars()
            .all()
        )
        chain = audit.verify(connection)
    assert len(kept) == len(invoices) and all(k.account_id is None and k.billing_name is None for k in kept)
    assert all(k.billing_email.startswith("psn_") for k in kept)
    assert purge == len(invoices)
    assert documents == [None] * len(shared)  # the collaborator's copy survives, anonymised
    assert chain.ok, chain.problems
    assert len(messages_for(read_mail, request_id)) == 3


def test_a_planted_leftover_fails_the_suite(cellcms: Settings, people: list[Person], engine: Engine) -> None:
    subject = people[1]  # erased by the previous test
    identifiers = checks.SubjectIdentifiers(
        emails=frozenset({subject.email}),
        names=frozenset({subject.full_name}),
        account_ids=frozenset({subject.account_id}),
    )
    with engine.begin() as connection:
        connection.execute(
            text(
                "UPDATE error_logs SET message = message || ' contact ' || :email "
                "WHERE id = (SELECT min(id) FROM error_logs)"
            ),
            {"email": subject.email},
        )
    try:
        import pandas as pd

        result = checks.erasure_checks(
            cellcms.database_url.get_secret_value(),
            load_datamap_for(cellcms),
            identifiers,
            pd.DataFrame(columns=["key", "version_id", "is_delete_marker"]),
            pd.DataFrame(columns=["id", "email", "name", "phone", "deleted"]),
        )
    finally:
        with engine.begin() as connection:
            connection.execute(
                text(
                    "UPDATE error_logs SET message = replace(message, ' contact ' || :email, '') "
                    "WHERE id = (SELECT min(id) FROM error_logs)"
                ),
                {"email": subject.email},
            )
    assert not result.success
    assert [(f.asset, f.column) for f in result.failures] == [("error_logs", "message")]
    assert subject.email not in json.dumps(result.summary())


def load_datamap_for(settings: Settings) -> Any:
    from privacy_ops.datamap import load_datamap

    return load_datamap(settings.datamap_path)


def test_five_wrong_codes_deny_the_request(
    cellcms: Settings, people: list[Person], engine: Engine, read_mail: Callable[[], list[EmailMessage]]
) -> None:
    subject = people[2]
    handle = start_flow(
        erasure_request, intake=SubjectIntake(account_id=subject.account_id), code_lifetime_hours=1
    )
    request_id = find_new_request(engine, "erasure", handle.started_at)
    right_code = _emailed_code(read_mail, request_id)
    wrong = [f"{n:06d}" for n in range(100000, 100010) if f"{n:06d}" != right_code][:5]
    states = [submit_code(engine, request_id, code) for code in wrong]
    assert [s.attempts_left for s in states] == [4, 3, 2, 1, 0]
    assert states[-1].status.value == "denied"
    with pytest.raises(RunnerError, match=r"denied|not waiting"):
        submit_code(engine, request_id, right_code, timeout=30)  # a sixth attempt, even with the right code
    handle.wait(WAIT)
    request = final_status(engine, request_id)
    assert request.status == Status.denied
    subjects_sent = messages_for(read_mail, request_id)
    assert len(subjects_sent) == 3 and any("could not carry out" in s for s in subjects_sent)
    with engine.connect() as connection:
        attempts = connection.execute(
            text("SELECT attempts, status FROM privacy_ops.verifications WHERE request_id = :r"), {"r": request_id}
        ).one()
        still_there = connection.execute(
            text("SELECT count(*) FROM accounts WHERE id = :id"), {"id": subject.account_id}
        ).scalar_one()
    assert tuple(attempts) == (5, "denied")
    assert still_there == 1


def test_an_expired_code_denies_the_request(
    cellcms: Settings, people: list[Person], engine: Engine, read_mail: Callable[[], list[EmailMessage]]
) -> None:
    subject = people[2]  # still there: their previous request was denied
    handle = start_flow(
        erasure_request, intake=SubjectIntake(account_id=subject.account_id), code_lifetime_hours=0.001
    )
    request_id = find_new_request(engine, "erasure", handle.started_at)
    assert handle.wait(WAIT) == Status.denied.value  # nobody entered the code within its 3.6 s
    with pytest.raises(RunnerError):
        submit_code(engine, request_id, _emailed_code(read_mail, request_id), timeout=10)
    with engine.connect() as connection:
        state = connection.execute(
            text("SELECT status FROM privacy_ops.verifications WHERE request_id = :r"), {"r": request_id}
        ).scalar_one()
        remaining = connection.execute(
            text("SELECT count(*) FROM accounts WHERE id = :id"), {"id": subject.account_id}
        ).scalar_one()
    assert state == "expired" and remaining == 1
    denial = [m for m in read_mail() if request_id in str(m["Subject"]) and "could not" in str(m["Subject"])]
    assert len(denial) == 1
    body = denial[0].get_body(preferencelist=("plain",))
    assert body is not None and "expired" in body.get_content()


def test_a_failed_act_step_reruns_without_a_second_email(
    cellcms: Settings, people: list[Person], engine: Engine, read_mail: Callable[[], list[EmailMessage]]
) -> None:
    subject = people[3]
    # A table the data map does not know references the account: the erasure transaction must fail whole.
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE legacy_notes (account_id bigint REFERENCES accounts(id))"))
        connection.execute(text("INSERT INTO legacy_notes VALUES (:id)"), {"id": subject.account_id})
    try:
        with pytest.raises(Exception, match="legacy_notes"):
            run_to_completion(erasure_request, "erasure", engine, read_mail, SubjectIntake(email=subject.email))
    finally:
        with engine.begin() as connection:
            connection.execute(text("DROP TABLE legacy_notes"))
    with engine.connect() as connection:
        request_id = connection.execute(
            text(
                "SELECT id FROM privacy_ops.requests WHERE \"right\" = 'erasure' ORDER BY received_at DESC LIMIT 1"
            )
        ).scalar_one()
        assert (
            connection.execute(
                text("SELECT count(*) FROM accounts WHERE id = :id"), {"id": subject.account_id}
            ).scalar_one()
            == 1
        )
    assert final_status(engine, request_id).status == Status.failed  # recorded by the flow's failure hook

    assert erasure_request(resume_request_id=request_id) == Status.completed.value

    sent = messages_for(read_mail, request_id)
    assert len(sent) == 3 and len(set(sent)) == 3  # acknowledgement, code, completion: each once
    with engine.connect() as connection:
        chain = audit.verify(connection)
        steps = [(e.step, e.outcome) for e in audit.entries_for_request(connection, request_id)]
    assert chain.ok, chain.problems
    assert steps.count(("act", "postgres_erased")) == 1
    assert ("run", "failed") in steps  # the failure is part of the one history
    assert steps[-1] == ("complete", "completed")


def test_an_operator_can_verify_by_other_means_with_a_reason(
    cellcms: Settings, people: list[Person], engine: Engine
) -> None:
    from typer.testing import CliRunner

    from privacy_ops.cli import app

    subject = people[0]
    handle = start_flow(access_request, intake=SubjectIntake(account_id=subject.account_id), code_lifetime_hours=1)
    request_id = find_new_request(engine, "access", handle.started_at)
    refused = CliRunner().invoke(app, ["verify", request_id, "--verified-by", "alice"])
    assert refused.exit_code != 0 and "--reason" in refused.output  # the reason is mandatory

    result = CliRunner().invoke(
        app, ["verify", request_id, "--verified-by", "alice", "--reason", "passport checked at the front desk"]
    )
    assert result.exit_code == 0, result.output
    assert handle.wait(WAIT) == Status.completed.value
    with engine.connect() as connection:
        entries = audit.entries_for_request(connection, request_id)
        method = connection.execute(
            text("SELECT method, verified_by, reason FROM privacy_ops.verifications WHERE request_id = :r"),
            {"r": request_id},
        ).one()
    operator = [e for e in entries if e.outcome == "verified_by_operator"]
    assert len(operator) == 1 and operator[0].details == {
        "operator": "alice",
        "reason": "passport checked at the front desk",
    }
    assert tuple(method) == ("operator", "alice", "passport checked at the front desk")

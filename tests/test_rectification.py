"""Rectification (GDPR art. 16) end to end, against the real local stack, plus the parameter model and the CLI.

The flows are driven as an operator drives them: start the request, read the codes from the SMTP sink (the identity
code from the address on file, the second code from the new address), resume the paused run with each. Then every
store is read directly (PostgreSQL, Stripe, the mail sink, the audit log) to judge the result.
"""

from __future__ import annotations

import re
import time
import urllib.parse
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from typing import Any

import pytest
import stripe
from sqlalchemy import Engine, inspect, text

from flows.parameters import SubjectIntake
from flows.rectification_request import rectification_request
from privacy_ops.lifecycle import audit, notify
from privacy_ops.lifecycle.requests import Status
from privacy_ops.pii import keyed_hash
from privacy_ops.rectification import HASH_PURPOSE, Correction, RectificationInput, submit_new_email_code
from privacy_ops.runner import code_from_mail, final_status, find_new_request, start_flow, submit_code
from privacy_ops.settings import Settings
from privacy_ops.stores import stripe_store
from privacy_ops.stores.errors import StoreError

WAIT = 300
ReadMail = Callable[[], list[EmailMessage]]


# ------------------------------------------------------------------------------------------- the parameter model


def test_the_form_rejects_bad_input_before_a_run() -> None:
    from prefect.utilities.schema_tools.validation import ValidationError as SchemaError
    from prefect.utilities.schema_tools.validation import validate
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="valid email address") as raised:
        RectificationInput(corrections=[Correction(field="email", value="dana-at-example.org")])
    assert "dana-at-example.org" not in str(raised.value.errors()[0]["msg"])
    bad_forms: list[dict[str, Any]] = [
        {"corrections": []},
        {"corrections": [{"field": "full_name", "value": "Dana\nRoe"}]},  # one line only
        {"corrections": [{"field": "full_name", "value": "   "}]},
        {"corrections": [{"field": "Full Name", "value": "Dana"}]},
        {"corrections": [{"field": "phone", "value": "1"}, {"field": "phone", "value": "2"}]},
        {"corrections": [{"field": "phone", "value": "1", "note": "x"}]},
    ]
    for bad in bad_forms:
        with pytest.raises(ValidationError):
            RectificationInput.model_validate(bad)
    assert "Dana Roe" not in repr(Correction(field="full_name", value="Dana Roe"))  # masked like every Pii

    # The Prefect server checks the same with the flow's JSON schema, before any run starts.
    schema = rectification_request.parameters.model_dump()
    with pytest.raises(SchemaError, match="value"):
        validate(
            {"corrections": {"corrections": [{"field": "email", "value": "not-an-address"}]}},
            schema,
            raise_on_error=True,
            preprocess=True,
            ignore_required=True,
        )
    validate(
        {"corrections": {"corrections": [{"field": "full_name", "value": "not-an-address"}]}},
        schema,
        raise_on_error=True,
        preprocess=True,
        ignore_required=True,
    )


def test_the_new_emails_speak_plainly() -> None:
    from datetime import UTC, datetime

    code = notify.render(
        "new_email_code",
        "req_rect01",
        {"right": "rectification", "code": "482913", "expires_at": datetime(2026, 11, 30, 15, 4, tzinfo=UTC)},
    )
    assert "482913" in code.text and "482913" in code.html and "482913" not in code.subject
    assert "confirmation code" not in code.subject  # the identity code's subject; runner.code_from_mail reads it
    changed = notify.render("email_changed", "req_rect01", {"right": "rectification"})
    for rendered in (code, changed):
        assert "req_rect01" in rendered.subject
        assert "within 30 days" in rendered.text and "privacy@cellcms.com" in rendered.html
    assert "has been changed" in changed.text and "did not ask for this change" in changed.text


def test_the_command_refuses_malformed_corrections_without_echoing_them() -> None:
    from typer.testing import CliRunner

    from privacy_ops.cli import app, parse_corrections

    assert parse_corrections(["full_name=Dana Roe", "email=d=r@x.org"]) == {
        "corrections": [{"field": "full_name", "value": "Dana Roe"}, {"field": "email", "value": "d=r@x.org"}]
    }
    runner = CliRunner()

    def said(*args: str) -> str:
        result = runner.invoke(app, ["request", "rectification", *args])
        assert result.exit_code == 2
        return " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.output).split())  # unwrap typer's error box

    assert "FIELD=VALUE" in said("--email", "dana@example.org", "--set", "full_name")
    refused = said("--email", "dana@example.org", "--set", "email=dana-at-example.org")
    assert "valid email address" in refused and "dana-at-example.org" not in refused
    assert "--resume continues" in said("--resume", "req_1", "--set", "phone=1")


# ------------------------------------------------------------------------------------------- against the stack


@pytest.fixture(scope="module")
def customers(cellcms: Settings, engine: Engine) -> list[int]:
    """Live accounts with a Stripe customer whose billing email is their own address, lowest first."""
    with engine.connect() as connection:
        return list(
            connection.execute(
                text(
                    "SELECT a.id FROM accounts a JOIN billing_profiles b ON b.account_id = a.id "
                    "WHERE a.deleted_at IS NULL AND b.billing_email = a.email ORDER BY a.id"
                )
            ).scalars()
        )


@pytest.fixture(scope="module")
def others(customers: list[int], company_customer: int) -> list[int]:
    """Customers for the other tests, one each (a second open request for an account would be a duplicate)."""
    remaining = [a for a in customers if a != company_customer]
    assert len(remaining) >= 4
    return remaining


@pytest.fixture(scope="module")
def company_customer(customers: list[int], engine: Engine) -> int:
    """A hard-case account (1..10) billed under a company name: its billing name is not a copy of its name."""
    with engine.connect() as connection:
        found = connection.execute(
            text(
                "SELECT a.id FROM accounts a JOIN billing_profiles b ON b.account_id = a.id "
                "WHERE a.id <= 10 AND a.id = ANY(:ids) AND b.billing_name <> a.full_name ORDER BY a.id LIMIT 1"
            ),
            {"ids": customers},
        ).scalar_one_or_none()
    assert found is not None, "the sandbox must hold a hard-case customer billed under a company name"
    return int(found)


def state_of(engine: Engine, client: stripe.StripeClient, account_id: int) -> dict[str, Any]:
    """Every rectifiable place of an account: its rows in the mapped tables and its Stripe customer."""
    with engine.connect() as connection:
        rows: dict[str, Any] = {
            table: [
                dict(row._mapping)
                for row in connection.execute(
                    text(f"SELECT * FROM {table} WHERE {key} = :id ORDER BY 1"), {"id": account_id}
                )
            ]
            for table, key in (
                ("accounts", "id"),
                ("billing_profiles", "account_id"),
                ("preferences", "account_id"),
                ("invoices", "account_id"),
            )
        }
    profile = rows["billing_profiles"]
    if profile:
        customer = client.v1.customers.retrieve(profile[0]["stripe_customer_id"]).to_dict()
        rows["stripe"] = {k: customer.get(k) for k in ("name", "email", "phone", "address")}
    return rows


def text_values(engine: Engine, schema: str) -> Iterator[tuple[str, str, str]]:
    """(table, column, value) of every non-null value of every column of a schema, as text."""
    inspector = inspect(engine)
    with engine.connect() as connection:
        for table in inspector.get_table_names(schema=schema):
            for column in inspector.get_columns(table, schema=schema):
                name = column["name"]
                rendered = f'host("{name}")' if str(column["type"]).upper() == "INET" else f'"{name}"::text'
                query = f'SELECT {rendered} FROM "{schema}"."{table}" WHERE "{name}" IS NOT NULL'
                for value in connection.execute(text(query)).scalars():
                    yield table, name, value


def places_holding(engine: Engine, needle: str) -> set[str]:
    """Where a value (or its percent-encoded form, as in referrers) appears, case-insensitively."""
    needles = {needle.lower(), urllib.parse.quote(needle, safe="").lower()}
    return {
        f"{schema}.{table}.{column}"
        for schema in ("public", "privacy_ops")
        for table, column, value in text_values(engine, schema)
        if any(n in value.lower() for n in needles)
    }


def mail_of(read_mail: ReadMail, request_id: str) -> list[EmailMessage]:
    return [m for m in read_mail() if request_id in str(m["Subject"])]


def body(message: EmailMessage) -> str:
    part = message.get_body(preferencelist=("plain",))
    assert part is not None
    return str(part.get_content())


def emailed_code(read_mail: ReadMail, request_id: str, new_address: bool = False) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if not new_address:
            code = code_from_mail(read_mail(), request_id)
            if code:
                return code
        for message in mail_of(read_mail, request_id):
            if new_address and "Confirm your new email address" in str(message["Subject"]):
                return re.search(r"\b(\d{6})\b", body(message)).group(1)  # type: ignore[union-attr]
        time.sleep(0.5)
    raise AssertionError(f"no code was emailed for {request_id}")


def start_rectification(engine: Engine, intake: SubjectIntake, corrections: dict[str, str]) -> tuple[Any, str]:
    handle = start_flow(
        rectification_request,
        intake=intake,
        corrections=RectificationInput.model_validate(
            {"corrections": [{"field": f, "value": v} for f, v in corrections.items()]}
        ),
        code_lifetime_hours=1,
    )
    return handle, find_new_request(engine, "rectification", handle.started_at)


def test_the_plan_refuses_what_cannot_be_corrected_and_skips_what_is_correct(
    cellcms: Settings, others: list[int], engine: Engine
) -> None:
    from privacy_ops import rectification
    from privacy_ops.datamap import load_datamap
    from privacy_ops.pii import Pii

    datamap = load_datamap(cellcms.datamap_path)
    with engine.connect() as connection:
        customer = connection.execute(
            text("SELECT email, full_name FROM accounts WHERE id = :id"), {"id": others[2]}
        ).one()
        unbilled, someone_elses = connection.execute(
            text(
                "SELECT a.id, (SELECT email FROM accounts WHERE id = :other) FROM accounts a WHERE NOT EXISTS "
                "(SELECT 1 FROM billing_profiles b WHERE b.account_id = a.id) ORDER BY a.id LIMIT 1"
            ),
            {"other": others[3]},
        ).one()

    def planned(account_id: int, corrections: dict[str, str]) -> rectification.Plan:
        reviewed = rectification.review(
            datamap,
            RectificationInput.model_validate(
                {"corrections": [{"field": f, "value": v} for f, v in corrections.items()]}
            ),
            Pii("on-file@example.org"),
        )
        with engine.connect() as connection:
            return rectification.plan(connection, datamap, reviewed, [account_id], [])

    plan = planned(
        others[2],
        {
            "email": someone_elses.upper(),  # another account's address, in other capitals
            "full_name": customer.full_name,  # already correct
            "billing_address_country": "Germany",  # not a two-letter code
            "billing_address_postal_code": "1" * 21,  # longer than the map's max_length
            "language": "de",
        },
    )
    assert plan.corrected == ["language"] and plan.unchanged == ("full_name",) and plan.new_email is None
    reasons = {refusal.field: refusal.reason for refusal in plan.refused}
    assert "another CellCMS account already uses" in reasons["email"]
    assert "two-letter code" in reasons["billing_address_country"]
    assert "longer than the 20 characters" in reasons["billing_address_postal_code"]
    assert someone_elses not in repr(plan) and someone_elses.upper() not in repr(plan)

    plan = planned(unbilled, {"billing_address_city": "Lyon", "email": f"fresh.{unbilled}@example.net"})
    assert plan.corrected == ["email"] and plan.new_email == Pii(f"fresh.{unbilled}@example.net")
    assert [r.field for r in plan.refused] == ["billing_address_city"]  # no billing profile: nothing to correct


def test_name_email_and_billing_city_are_corrected_everywhere_and_the_old_address_is_gone(
    cellcms: Settings,
    company_customer: int,
    engine: Engine,
    stripe_client: stripe.StripeClient,
    read_mail: ReadMail,
) -> None:
    account_id = company_customer
    before = state_of(engine, stripe_client, account_id)
    account, profile = before["accounts"][0], before["billing_profiles"][0]
    old_email, company = account["email"], profile["billing_name"]
    assert before["stripe"]["email"] == old_email and before["stripe"]["name"] == company
    assert places_holding(engine, old_email) > {"public.accounts.email"}  # also in free text and invoices
    new_email, new_name, new_city = f"dana.rectified.{account_id}@example.net", "Dana Quill Rectified", "Neustadt"

    handle, request_id = start_rectification(
        engine,
        SubjectIntake(account_id=account_id),
        {"full_name": new_name, "email": new_email, "billing_address_city": new_city, "invoice_history": "x"},
    )
    submit_code(engine, request_id, emailed_code(read_mail, request_id))
    confirmed = submit_new_email_code(engine, request_id, emailed_code(read_mail, request_id, new_address=True))
    assert confirmed.status.value == "verified"
    assert handle.wait(WAIT) == Status.completed.value

    after = state_of(engine, stripe_client, account_id)
    account, profile, customer = after["accounts"][0], after["billing_profiles"][0], after["stripe"]
    assert (account["email"], account["full_name"]) == (new_email, new_name)
    assert (profile["billing_email"], profile["address_city"]) == (new_email, new_city)
    assert profile["billing_name"] == company  # a different value, not a copy of the name: untouched
    assert (customer["email"], customer["name"]) == (new_email, company)
    assert customer["address"] == {**before["stripe"]["address"], "city": new_city}
    assert stripe_client.v1.customers.list(params={"email": old_email}).data == []
    assert after["invoices"] == before["invoices"]  # tax records stay as issued (refused by the data map)
    assert after["preferences"] == before["preferences"]
    # The old address is nowhere but in those invoices (and, hashed, in the audit log); the new values were
    # written only where the map says they live, never into the privacy_ops schema.
    assert places_holding(engine, old_email) == {"public.invoices.billing_email"}
    assert places_holding(engine, new_email) == {
        "public.accounts.email",
        "public.billing_profiles.billing_email",
    }
    assert places_holding(engine, new_name) == {"public.accounts.full_name"}

    sent = mail_of(read_mail, request_id)
    to_old = sorted(str(m["Subject"]).split(" ")[0] for m in sent if m["To"] == old_email)
    to_new = sorted(str(m["Subject"]).split(" ")[0] for m in sent if m["To"] == new_email)
    assert len(sent) == 5 and len({str(m["Subject"]) for m in sent}) == 5  # each kind once
    assert to_old == ["The", "We", "Your"]  # the change notice, the acknowledgement, the identity code
    assert to_new == ["Confirm", "Your"]  # the new address's code, the completion
    notice = next(m for m in sent if "was changed" in str(m["Subject"]))
    assert notice["To"] == old_email and new_email not in body(notice)
    completion = body(next(m for m in sent if "is complete" in str(m["Subject"])))
    assert "- Full name: corrected" in completion and "- Email: corrected" in completion
    assert "- Billing address city: corrected" in completion
    assert "- Invoice history: not corrected. Invoices are tax records" in completion

    request = final_status(engine, request_id)
    outcome = request.outcome["rectification"]
    assert outcome["corrected"] == ["full_name", "email", "billing_address_city"]
    assert set(outcome["refused"]) == {"invoice_history"}
    assert outcome["postgres"]["corrected"] == {
        "accounts.full_name": 1,
        "billing_profiles.billing_name": 0,
        "accounts.email": 1,
        "billing_profiles.billing_email": 1,
        "billing_profiles.address_city": 1,
    }
    assert outcome["postgres"]["copies_left"] == {"billing_profiles.billing_name": 1}
    assert outcome["postgres"]["old_email_redacted"]  # documents, tickets, logs mentioned the old address
    assert outcome["stripe"]["fields_corrected"] == 2 and outcome["stripe"]["fields_left"] == ["name"]
    with engine.connect() as connection:
        entries = audit.entries_for_request(connection, request_id)
        chain = audit.verify(connection)
    acted = next(e for e in entries if e.outcome == "postgres_rectified")
    assert (
        keyed_hash(cellcms.secret_key.get_secret_value(), old_email, HASH_PURPOSE)
        in acted.details["values"]["email"]["old"]
    )
    assert chain.ok, chain.problems

    # A rerun of the finished request does nothing again: no email, no change, no new audit entry.
    assert rectification_request(resume_request_id=request_id) == Status.completed.value
    assert len(mail_of(read_mail, request_id)) == 5
    assert state_of(engine, stripe_client, account_id) == after
    with engine.connect() as connection:
        assert len(audit.entries_for_request(connection, request_id)) == len(entries)


def test_refused_and_unknown_fields_are_answered_and_change_nothing(
    cellcms: Settings, others: list[int], engine: Engine, stripe_client: stripe.StripeClient, read_mail: ReadMail
) -> None:
    account_id = others[-1]
    before = state_of(engine, stripe_client, account_id)
    email = before["accounts"][0]["email"]
    handle, request_id = start_rectification(
        engine, SubjectIntake(email=email.upper()), {"invoice_history": "CC-2020-1", "favourite_colour": "teal"}
    )
    assert handle.wait(WAIT) == Status.denied.value  # answered without asking for a code: nothing could change

    request = final_status(engine, request_id)
    assert request.status == Status.denied
    refused = request.outcome["rectification"]["refused"]
    assert set(refused) == {"invoice_history", "favourite_colour"} and "tax records" in refused["invoice_history"]
    assert state_of(engine, stripe_client, account_id) == before
    (answer,) = mail_of(read_mail, request_id)
    assert answer["To"] == email and "could not carry out" in str(answer["Subject"])
    text_body = " ".join(body(answer).split())
    assert "invoice history: invoices are tax records" in text_body
    assert "we hold no field called favourite_colour" in text_body and "teal" not in text_body
    with engine.connect() as connection:
        steps = [(e.step, e.outcome) for e in audit.entries_for_request(connection, request_id)]
        kept = connection.execute(
            text("SELECT count(*) FROM privacy_ops.subject_snapshots WHERE request_id = :r"), {"r": request_id}
        ).scalar_one()
    assert ("review", "reviewed") in steps and steps[-1] == ("complete", "denied")
    assert not any(step == "act" for step, _ in steps) and kept == 0


def test_a_new_address_that_is_not_confirmed_changes_nothing(
    cellcms: Settings,
    others: list[int],
    engine: Engine,
    stripe_client: stripe.StripeClient,
    read_mail: ReadMail,
) -> None:
    account_id = others[0]
    before = state_of(engine, stripe_client, account_id)
    old_email = before["accounts"][0]["email"]
    handle, request_id = start_rectification(
        engine,
        SubjectIntake(account_id=account_id),
        {"email": f"someone.else.{account_id}@example.net", "full_name": "Not Confirmed"},
    )
    submit_code(engine, request_id, emailed_code(read_mail, request_id))
    right = emailed_code(read_mail, request_id, new_address=True)
    wrong = [f"{n:06d}" for n in range(200000, 200010) if f"{n:06d}" != right][:5]
    states = [submit_new_email_code(engine, request_id, code) for code in wrong]
    assert [s.attempts_left for s in states] == [4, 3, 2, 1, 0] and states[-1].status.value == "denied"
    assert handle.wait(WAIT) == Status.denied.value

    assert state_of(engine, stripe_client, account_id) == before  # neither the email nor the name changed
    sent = mail_of(read_mail, request_id)
    assert len(sent) == 4 and len({str(m["Subject"]) for m in sent}) == 4
    denial = next(m for m in sent if "could not carry out" in str(m["Subject"]))
    assert denial["To"] == old_email and "new email address was not confirmed" in " ".join(body(denial).split())
    assert not any("was changed" in str(m["Subject"]) for m in sent)
    with engine.connect() as connection:
        assert audit.verify(connection).ok


def test_a_failed_stripe_step_resumes_without_a_second_email_or_change(
    cellcms: Settings,
    others: list[int],
    engine: Engine,
    stripe_client: stripe.StripeClient,
    read_mail: ReadMail,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    account_id = others[1]
    old_email = state_of(engine, stripe_client, account_id)["accounts"][0]["email"]
    new_email, new_phone = f"resumed.{account_id}@example.net", "+49 30 1234567"

    def stripe_down(*args: Any, **kwargs: Any) -> Any:
        raise StoreError("stripe: correct customer failed: 503 api_error", status=503, code="api_error")

    monkeypatch.setattr(stripe_store, "correct_customer", stripe_down)
    handle, request_id = start_rectification(
        engine, SubjectIntake(email=old_email), {"email": new_email, "phone": new_phone}
    )
    submit_code(engine, request_id, emailed_code(read_mail, request_id))
    submit_new_email_code(engine, request_id, emailed_code(read_mail, request_id, new_address=True))
    with pytest.raises(StoreError):
        handle.wait(WAIT)
    assert final_status(engine, request_id).status == Status.failed
    assert state_of(engine, stripe_client, account_id)["accounts"][0]["email"] == new_email  # PostgreSQL done
    monkeypatch.undo()

    assert rectification_request(resume_request_id=request_id) == Status.completed.value

    after = state_of(engine, stripe_client, account_id)
    assert (after["stripe"]["email"], after["accounts"][0]["phone"]) == (new_email, new_phone)
    sent = mail_of(read_mail, request_id)
    assert len(sent) == 5 and len({str(m["Subject"]) for m in sent}) == 5  # no code asked for twice
    with engine.connect() as connection:
        steps = [(e.step, e.outcome) for e in audit.entries_for_request(connection, request_id)]
        chain = audit.verify(connection)
    assert steps.count(("act", "postgres_rectified")) == 1 and ("run", "failed") in steps
    assert steps[-1] == ("complete", "completed") and chain.ok, chain.problems

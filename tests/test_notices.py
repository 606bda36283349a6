"""Breach notification and policy-change notices against the real local stack (PostgreSQL, SMTP sink, Prefect).

Each test runs a flow (or the CLI) the way an operator does and then looks at what arrived in the SMTP sink, the
notice's rows and the audit log directly. Expected recipients are computed here with plain SQL over CellCMS, not
through the project's data-map code. The last test sends a breach notice to 10,000 accounts, SIGKILLs the sending
process halfway and reruns it: nobody gets a second email.
"""

from __future__ import annotations

import email.parser
import email.policy
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text
from typer.testing import CliRunner

from flows.breach_notice import breach_notice
from flows.policy_notice import policy_notice
from privacy_ops import notices
from privacy_ops.lifecycle import audit
from privacy_ops.notices import BreachNotice, NoticeError, PolicyNotice
from privacy_ops.services import Services, services
from privacy_ops.settings import Settings

ReadMail = Callable[[], list[EmailMessage]]
PROJECT_ROOT = Path(__file__).resolve().parent.parent
DETECTED = datetime.now(UTC) - timedelta(hours=20)
TEXTS = {
    "description": "A backup of the support system was readable from the internet for about three hours.",
    "likely_consequences": "Someone may use the details to send convincing phishing emails",
    "measures_taken": "We closed the access, rotated every credential of the system and reviewed its logs",
    "advice": "Be careful with emails that ask you to sign in or pay",
}
BULK_FIRST, BULK_COUNT = 1_000_001, 10_000


def breach(breach_id: str, **selection: Any) -> BreachNotice:
    return BreachNotice.model_validate(
        {"breach_id": breach_id, "detected_at": DETECTED, "rate_per_second": 1000, **TEXTS, **selection}
    )


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def svc(cellcms: Settings) -> Services:
    return services()


def mailed(read_mail: ReadMail, reference: str) -> list[EmailMessage]:
    """The messages of one notice (by its Message-ID), in arrival order."""
    return [m for m in read_mail() if f"<{reference}." in str(m["Message-ID"])]


def recipients(messages: list[EmailMessage]) -> Counter[str]:
    return Counter(str(m["To"]).lower() for m in messages)


def emails_of(engine: Engine, query: str) -> dict[int, str]:
    """account id -> email for the accounts `query` (SQL returning account ids) selects."""
    with engine.connect() as connection:
        rows = connection.execute(text(f"SELECT id, lower(email) FROM accounts WHERE id IN ({query})")).all()
    return {int(r[0]): str(r[1]) for r in rows}


def delivery_statuses(engine: Engine, notice_id: str) -> dict[int, str]:
    with engine.connect() as connection:
        rows = connection.execute(
            text("SELECT account_id, status FROM privacy_ops.notice_deliveries WHERE notice_id = :n"),
            {"n": notice_id},
        ).all()
    return {int(r[0]): str(r[1]) for r in rows}


def audit_steps(engine: Engine, notice_id: str) -> list[tuple[str, str]]:
    with engine.connect() as connection:
        return [(e.step, e.outcome) for e in audit.entries_for_request(connection, notice_id)]


def chain_verifies(engine: Engine) -> None:
    with engine.connect() as connection:
        verdict = audit.verify(connection)
    assert verdict.ok, verdict.problems


# ------------------------------------------------------------------------------------------------------- forms


def test_forms_reject_bad_input_before_a_run() -> None:
    from prefect.exceptions import ParameterTypeError

    schema = breach_notice.parameters.model_dump()["definitions"]
    form = schema["BreachNotice"]["properties"]
    assert form["breach_id"]["pattern"] and "enum" in schema["Category"], "the UI renders a pattern and a dropdown"
    assert {"description", "detected_at", "likely_consequences", "measures_taken", "account_ids"} <= set(form)
    assert policy_notice.parameters.model_dump()["definitions"]["PolicyNotice"]["properties"]["version"]["pattern"]

    good = {"breach_id": "inc-1", **TEXTS, "detected_at": DETECTED.isoformat(), "account_ids": [1]}
    breach_notice.validate_parameters({"params": good})
    bad = {
        "nobody affected": {**good, "account_ids": []},
        "future": {**good, "detected_at": "2999-01-01T00:00:00Z"},
        "unknown category": {**good, "categories": ["secrets"]},
        "address in text": {**good, "description": "The file named anna.smith@example.org was readable online."},
        "extra field": {**good, "email": "x"},
    }
    for case, params in bad.items():
        with pytest.raises(ParameterTypeError) as rejected:
            breach_notice.validate_parameters({"params": params})
        assert "anna.smith" not in str(rejected.value), f"{case}: the error must not repeat what was typed"
    for version, effective in (("v2", "2027-01-01"), ("2026-02-30", "2027-01-01"), ("2026-12-01", "2026-11-01")):
        with pytest.raises(ParameterTypeError):
            policy_notice.validate_parameters(
                {"params": {"version": version, "effective_on": effective, "changes": "x" * 30}}
            )


def test_pacer_keeps_the_rate() -> None:
    pacer = notices.Pacer(50)
    started = time.monotonic()
    for _ in range(26):
        pacer.wait()
    assert 0.45 <= time.monotonic() - started < 1.5  # 25 intervals of 20 ms


# -------------------------------------------------------------------------------------------- breach notices


def test_breach_by_category_emails_each_affected_person_once_and_reports_to_the_authority(
    svc: Services, engine: Engine, read_mail: ReadMail
) -> None:
    affected = emails_of(
        engine, "SELECT account_id FROM support_tickets UNION SELECT account_id FROM survey_responses"
    )
    everyone = emails_of(engine, "SELECT id FROM accounts")
    with engine.connect() as connection:
        records = connection.execute(
            text(
                "SELECT (SELECT count(*) FROM support_tickets) + (SELECT count(*) FROM support_messages)"
                " + (SELECT count(*) FROM survey_responses)"
            )
        ).scalar_one()
    assert 0 < len(affected) < len(everyone), "the sandbox must have people with and without communications"
    params = breach(unique("inc-comms"), categories=["communications"], batch_size=7)

    result = breach_notice(params)

    notice_id = params.notice_id
    assert result["people"] == len(affected) and result["records"] == records
    assert result["categories"] == ["communications"]
    assert result["this_run"]["batches"] == -(-len(affected) // 7)
    assert result["deliveries"]["sent"] == len(affected) and result["authority_summary"] == "sent"
    messages = mailed(read_mail, notice_id)
    assert recipients(messages) == Counter(affected.values()), "each affected person exactly once, nobody else"
    body = messages[0].get_body(("plain",))
    html = messages[0].get_body(("html",))
    assert body is not None and html is not None
    for fragment in ("three hours", "phishing emails", "rotated every credential", "messages to our support team"):
        assert fragment in body.get_content()
    assert "supervisory authority" in body.get_content() and notice_id in str(messages[0]["Subject"])

    # What the supervisory authority needs, within 72 hours: emailed once to compliance ops, stored, published.
    (summary,) = [
        m for m in read_mail() if params.breach_id in str(m["Subject"]) and "[privacy-ops]" in str(m["Subject"])
    ]
    assert summary["To"] == svc.settings.compliance_email
    content = summary.get_content()
    deadline = (DETECTED + timedelta(hours=72)).strftime("%Y-%m-%d %H:%M")
    assert (
        deadline in content
        and f"{len(affected)} accounts" in content
        and f"Records affected (approximately): {records}" in content
    )
    assert not any(address in content for address in everyone.values())
    with engine.connect() as connection:
        stored = notices.get_notice(connection, notice_id)
    assert stored is not None and stored.status == "completed"
    assert stored.report["people"] == len(affected) and stored.report["records"] == records
    assert stored.report["tables"].keys() == {"support_tickets", "support_messages", "survey_responses"}
    assert stored.report["authority_deadline"].startswith(deadline.replace(" ", "T"))
    assert set(delivery_statuses(engine, notice_id).values()) == {"sent"}

    from prefect.artifacts import Artifact

    artifact: Any = Artifact.get(f"breach-{params.breach_id}")
    markdown = str(artifact.data)
    assert "supervisory authority" in markdown and f"**{len(affected)}**" in markdown
    assert not any(address in markdown for address in everyone.values())

    # A rerun sends nothing, to nobody.
    again = breach_notice(params)
    assert again["this_run"]["sent"] == 0 and again["authority_summary"] == "already_sent"
    assert recipients(mailed(read_mail, notice_id)) == Counter(affected.values())
    steps = audit_steps(engine, notice_id)
    assert steps[:2] == [("notice_opened", "recorded"), ("breach_assessed", "selected")]
    assert steps.count(("notice_batch", "sent")) == result["this_run"]["batches"]
    assert steps.count(("notice_completed", "completed")) == 1
    chain_verifies(engine)


def test_breach_known_by_account_ids_counts_their_records_in_the_categories_given(
    svc: Services, engine: Engine, read_mail: ReadMail
) -> None:
    ids = sorted(emails_of(engine, "SELECT account_id FROM billing_profiles LIMIT 3"))
    params = breach(unique("inc-ids"), account_ids=[*ids, 987_654_321], categories=["billing"])
    with engine.connect() as connection:
        records = connection.execute(
            text(
                "SELECT (SELECT count(*) FROM billing_profiles WHERE account_id = ANY(:ids))"
                " + (SELECT count(*) FROM invoices WHERE account_id = ANY(:ids))"
            ),
            {"ids": ids},
        ).scalar_one()

    result = breach_notice(params)

    assert result["people"] == 3 and result["records"] == records and result["categories"] == ["billing"]
    with engine.connect() as connection:
        stored = notices.get_notice(connection, params.notice_id)
    assert stored is not None and stored.report["unknown_account_ids"] == 1
    assert any("Stripe" in line for line in stored.report["elsewhere"])
    assert recipients(mailed(read_mail, params.notice_id)) == Counter(
        emails_of(engine, ",".join(map(str, ids))).values()
    )


def test_bad_breach_input_gets_a_clear_answer_a_record_and_no_action(
    svc: Services, engine: Engine, read_mail: ReadMail
) -> None:
    nobody = breach(unique("inc-nobody"), account_ids=[987_654_321])
    with pytest.raises(NoticeError, match="no affected accounts: none of the 1 account id"):
        breach_notice(nobody)
    unknown_table = breach(unique("inc-table"), tables=["no_such_table"])
    with pytest.raises(NoticeError, match=r"not in the data map: table\(s\) no_such_table"):
        breach_notice(unknown_table)
    for params in (nobody, unknown_table):
        with engine.connect() as connection:
            stored = notices.get_notice(connection, params.notice_id)
        assert stored is not None and stored.status == "rejected" and stored.outcome["rejected"]
        assert delivery_statuses(engine, params.notice_id) == {}
        assert mailed(read_mail, params.notice_id) == []
        assert ("notice_rejected", "rejected") in audit_steps(engine, params.notice_id)

    # Nothing went out under a rejected notice: it may be corrected under the same id.
    fixed = unknown_table.model_copy(update={"tables": ["survey_responses"]})
    assert breach_notice(fixed)["people"] == len(emails_of(engine, "SELECT account_id FROM survey_responses"))
    assert ("notice_revised", "recorded") in audit_steps(engine, fixed.notice_id)

    # A rerun must repeat the notice exactly: different wording under the same id is refused before anything.
    first_id = min(emails_of(engine, "SELECT id FROM accounts"))
    sent = breach(unique("inc-changed"), account_ids=[first_id])
    breach_notice(sent)
    changed = sent.model_copy(update={"description": "Something else happened to the support backup system."})
    with pytest.raises(NoticeError, match="went out with different description"):
        breach_notice(changed)
    assert len(mailed(read_mail, sent.notice_id)) == 1
    with engine.connect() as connection:
        stored = notices.get_notice(connection, sent.notice_id)
    assert stored is not None and stored.status == "completed", "the notice that went out stays as it was"
    assert audit_steps(engine, sent.notice_id)[-1] == ("notice_rejected", "rejected")
    chain_verifies(engine)


def test_a_recipient_in_doubt_after_a_crash_is_not_resent_and_claims_are_released(
    svc: Services, engine: Engine, read_mail: ReadMail
) -> None:
    ids = sorted(emails_of(engine, "SELECT id FROM accounts WHERE deleted_at IS NULL LIMIT 4"))
    params = breach(unique("inc-crash"), account_ids=ids)
    notices.open_notice(svc.engine, params, now=svc.now())
    notices.select_breach_recipients(svc.engine, svc.datamap, params, now=svc.now())
    # What a SIGKILL leaves: one recipient handed to SMTP (maybe delivered), one claimed but never tried.
    with engine.begin() as connection:
        for account_id, status in ((ids[0], "sending"), (ids[1], "claimed")):
            connection.execute(
                text(
                    "UPDATE privacy_ops.notice_deliveries SET status = :s, batch = 1 "
                    "WHERE notice_id = :n AND account_id = :a"
                ),
                {"s": status, "n": params.notice_id, "a": account_id},
            )

    result = breach_notice(params)

    addresses = emails_of(engine, ",".join(map(str, ids)))
    assert recipients(mailed(read_mail, params.notice_id)) == Counter(addresses[i] for i in ids[1:])
    assert result["deliveries"]["unconfirmed"] == 1 and result["this_run"]["unconfirmed"] == 1
    assert delivery_statuses(engine, params.notice_id)[ids[0]] == "unconfirmed"
    assert ("notice_recovered", "unconfirmed") in audit_steps(engine, params.notice_id)
    breach_notice(params)
    assert len(mailed(read_mail, params.notice_id)) == 3, "still nobody resent"


# -------------------------------------------------------------------------------------------- policy notices


def test_policy_notice_reaches_every_active_account_once_per_version(
    svc: Services, engine: Engine, read_mail: ReadMail
) -> None:
    active = emails_of(engine, "SELECT id FROM accounts WHERE deleted_at IS NULL")
    deleted = emails_of(engine, "SELECT id FROM accounts WHERE deleted_at IS NOT NULL")
    assert deleted, "the sandbox must hold deleted accounts"
    day = date.today() + timedelta(days=int(uuid.uuid4().int % 3000))  # a fresh version per test session
    versions = [day.isoformat(), f"{day.isoformat()}.2"]
    changes = "We now use a second analytics provider in the EU; the section on third parties is updated."

    for version in versions:
        params = PolicyNotice(
            version=version,
            effective_on=day + timedelta(days=30),
            changes=changes,
            batch_size=9,
            rate_per_second=500,
        )
        result = policy_notice(params)
        assert result["people"] == len(active) and result["deliveries"]["sent"] == len(active)
        assert policy_notice(params)["this_run"]["sent"] == 0, "a rerun sends nothing"
        messages = mailed(read_mail, params.notice_id)
        assert recipients(messages) == Counter(active.values()), "every active account once, no deleted one"
        body = messages[0].get_body(("plain",))
        assert body is not None and "takes effect on" in body.get_content()
        assert version in str(messages[0]["Subject"])
        with engine.connect() as connection:
            told = notices.policy_recipients(connection, version)
        assert {a for a, status, sent_at in told if status == "sent" and sent_at} == set(active)
    chain_verifies(engine)


# ------------------------------------------------------------------------------------------------------- CLI


def test_cli_answers_bad_input_in_one_line_and_records_it(svc: Services, engine: Engine) -> None:
    from privacy_ops.cli_notify import notify_app

    runner = CliRunner()
    common = [
        "--description", TEXTS["description"], "--detected-at", DETECTED.isoformat(),
        "--consequences", TEXTS["likely_consequences"], "--measures", TEXTS["measures_taken"],
    ]  # fmt: skip
    with engine.connect() as connection:
        before = connection.execute(text("SELECT count(*) FROM privacy_ops.audit_log")).scalar_one()

    no_selection = runner.invoke(notify_app, ["breach", "--breach-id", unique("inc-cli"), *common])
    bad_version = runner.invoke(
        notify_app, ["policy", "--version", "next", "--effective-on", "2027-01-01", "--changes", "x" * 30]
    )
    nobody = runner.invoke(
        notify_app, ["breach", "--breach-id", unique("inc-cli"), *common, "--account-id", "987654321"]
    )

    for outcome, message in (
        (no_selection, "name the affected accounts"),
        (bad_version, "version: String should match pattern"),
        (nobody, "no affected accounts"),
    ):
        assert outcome.exit_code == 1, outcome.output
        (line,) = [line for line in outcome.output.splitlines() if line.startswith("error: ")]
        assert message in line and "Traceback" not in outcome.output
    assert len(no_selection.output.strip().splitlines()) == len(bad_version.output.strip().splitlines()) == 1
    with engine.connect() as connection:
        recorded = connection.execute(
            text("SELECT step, outcome FROM privacy_ops.audit_log WHERE seq > :seq ORDER BY seq"), {"seq": before}
        ).all()
    assert [tuple(r) for r in recorded].count(("notice_rejected", "invalid_input")) == 2
    assert [tuple(r) for r in recorded].count(("notice_rejected", "rejected")) == 1


# ---------------------------------------------------------------------------------- 10,000 accounts, SIGKILL


@pytest.fixture
def bulk_accounts(svc: Services, engine: Engine) -> Iterator[dict[int, str]]:
    """10,000 minimal accounts above the seeded range, inserted set-based; removed afterwards."""
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO accounts (id, email, full_name, password_hash, plan, created_at) "
                "SELECT n, 'bulk' || n || '@example.test', 'Bulk ' || n, 'x', 'free', now() "
                "FROM generate_series(:first, :last) AS n"
            ),
            {"first": BULK_FIRST, "last": BULK_FIRST + BULK_COUNT - 1},
        )
    yield {n: f"bulk{n}@example.test" for n in range(BULK_FIRST, BULK_FIRST + BULK_COUNT)}
    with engine.begin() as connection:
        connection.execute(text("DELETE FROM accounts WHERE id >= :first"), {"first": BULK_FIRST})


def _notice_files(maildir: Path, reference: str, seen: dict[str, str | None]) -> dict[str, str | None]:
    """file name -> recipient of every message of the notice in the maildir (headers only; `seen` is a cache)."""
    parser = email.parser.BytesHeaderParser(policy=email.policy.default)
    for folder in ("new", "cur"):
        for name in os.listdir(maildir / folder) if (maildir / folder).exists() else []:
            if name in seen:
                continue
            with open(maildir / folder / name, "rb") as handle:
                headers = parser.parse(handle)
            seen[name] = str(headers["To"]).lower() if f"<{reference}." in str(headers["Message-ID"]) else None
    return seen


@pytest.mark.timeout(900)  # ~150-260 s measured on 2 shared cores; the SMTP sink sets the pace
def test_breach_notice_to_10000_accounts_survives_sigkill_and_sends_nobody_two(
    svc: Services, engine: Engine, bulk_accounts: dict[int, str], maildir: Path, tmp_path: Path
) -> None:
    breach_id = unique("inc-bulk")
    reference = f"breach.{breach_id}"
    accounts_file = tmp_path / "affected.txt"
    accounts_file.write_text("\n".join(map(str, bulk_accounts)) + "\n")
    command = [
        sys.executable, "-m", "privacy_ops.cli_notify", "breach", "--breach-id", breach_id,
        "--description", TEXTS["description"], "--detected-at", DETECTED.isoformat(),
        "--consequences", TEXTS["likely_consequences"], "--measures", TEXTS["measures_taken"],
        "--accounts-file", str(accounts_file), "--batch-size", "200", "--rate", "1000",
    ]  # fmt: skip
    seen: dict[str, str | None] = {}
    started = time.monotonic()

    log = tmp_path / "first-run.log"
    with log.open("wb") as output:
        first = subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=output, stderr=subprocess.STDOUT)
    try:
        # Half of them, and not at a batch boundary: the kill lands inside a batch.
        while sum(1 for to in _notice_files(maildir, reference, seen).values() if to) < BULK_COUNT // 2 + 77:
            assert first.poll() is None, f"the first run ended before it was killed: {log.read_text()[-2000:]}"
            assert time.monotonic() - started < 300, "half of the emails did not arrive within 300 s"
            time.sleep(0.2)
        first.send_signal(signal.SIGKILL)
    finally:
        first.kill()
        first.wait()
    killed_after = time.monotonic() - started
    with engine.connect() as connection:
        at_kill = notices.delivery_counts(connection, reference)
    assert 0 < at_kill["sent"] < BULK_COUNT

    second = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=420)
    total = time.monotonic() - started
    assert second.returncode == 0, second.stdout + second.stderr
    with engine.connect() as connection:
        final = notices.delivery_counts(connection, reference)
    statuses = delivery_statuses(engine, reference)
    received = Counter(to for to in _notice_files(maildir, reference, seen).values() if to)

    assert max(received.values()) == 1, "nobody received the notice twice"
    in_doubt = {bulk_accounts[a] for a, status in statuses.items() if status == "unconfirmed"}
    assert len(in_doubt) <= 1, "a SIGKILL leaves at most the one recipient being sent to in doubt"
    assert set(received) - in_doubt == set(bulk_accounts.values()) - in_doubt, "everyone else exactly once"
    assert final["sent"] + final["unconfirmed"] == BULK_COUNT and final["pending"] == 0
    assert f"{final['unconfirmed']} unconfirmed" in second.stdout
    chain_verifies(engine)
    print(
        f"\n10,000-account breach notice: killed after {killed_after:.1f} s with {at_kill['sent']} sent "
        f"({at_kill['claimed']} claimed, {at_kill['sending']} in doubt); rerun finished at {total:.1f} s; "
        f"{len(received)} addresses received it once, {final['unconfirmed']} unconfirmed"
    )

    for name, to in seen.items():  # keep the session's maildir small for the tests that parse all of it
        if to is not None:
            for folder in ("new", "cur"):
                (maildir / folder / name).unlink(missing_ok=True)

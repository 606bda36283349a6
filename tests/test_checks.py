"""Erasure and access-package checks (privacy_ops.checks) against a real PostgreSQL.

Two people in a fresh sandbox database: Alice (account 1), erased by hand before each test, and Bob (account 2),
whose data mentions things that resemble Alice's without being hers ("Alice Smithson", 10.0.0.90). Each test
plants one leftover of Alice and expects exactly that failure; none may print, log or return her values.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

from cellcms_sandbox.schema import metadata
from privacy_ops.checks import (
    CheckResult,
    Failure,
    SubjectIdentifiers,
    access_package_checks,
    erasure_checks,
    text_pattern,
)
from privacy_ops.datamap.loader import load_datamap
from privacy_ops.datamap.model import DataMap
from privacy_ops.pii import pseudonym

DATAMAP_PATH = Path(__file__).resolve().parent.parent / "datamap" / "cellcms.yaml"
KEY = "test-secret-key-test-secret-key-0123456789"
ALICE_PSEUDONYM = pseudonym(KEY, 1)

ALICE = SubjectIdentifiers(
    emails=frozenset({"Alice.Smith@example.com"}),
    names=frozenset({"Alice Smith"}),
    phones=frozenset({"+49 170 1111111"}),
    ips=frozenset({"10.0.0.9"}),
    addresses=frozenset({"1 Alice Road"}),
    external_ids=frozenset({"cus_ALICE1", "DE111111111", "dev-alice-1"}),
    account_ids=frozenset({1}),
    pseudonyms=frozenset({ALICE_PSEUDONYM}),
)
# Every form in which one of Alice's values could leak into output, logs or a result.
ALICE_VALUES = [
    "alice.smith@example.com",
    "alice.smith%40example.com",
    "alice smith",
    "1701111111",
    "170 1111111",
    "10.0.0.9",
    "10\\.0\\.0\\.9",
    "cus_alice1",
    "de111111111",
    "dev-alice-1",
    "1 alice road",
    ALICE_PSEUDONYM,
]

SEED = """
INSERT INTO accounts (id, email, full_name, password_hash, phone, plan, created_at) VALUES
  (1, 'Alice.Smith@example.com', 'Alice Smith', 'h', '+49 170 1111111', 'pro', now()),
  (2, 'bob@example.org', 'Bob Jones', 'h', '+49 170 2222222', 'free', now());
INSERT INTO preferences VALUES (1, 'en', 'dark', 'UTC', true), (2, 'de', 'light', 'UTC', false);
INSERT INTO cookie_consents (id, account_id, category, granted, recorded_at, ip_address) VALUES
  (1, 1, 'analytics', true, now(), '10.0.0.9'), (2, 2, 'analytics', false, now(), '10.0.0.90');
INSERT INTO billing_profiles VALUES
  (1, 'cus_ALICE1', 'Alice Smith', 'alice.smith@example.com', '1 Alice Road', 'Berlin', '10115', 'DE',
   'DE111111111'),
  (2, 'cus_BOB2', 'Bob Jones', 'bob@example.org', '2 Bob Street', 'Hamburg', '20095', 'DE', NULL);
INSERT INTO invoices (id, account_id, invoice_number, stripe_invoice_id, issued_at, amount_cents, tax_cents,
                      currency, tax_country, billing_name, billing_email, billing_address) VALUES
  (1, 1, 'INV-1', 'in_1', current_date, 1000, 190, 'eur', 'DE', 'Alice Smith', 'alice.smith@example.com',
   '1 Alice Road, Berlin'),
  (2, 2, 'INV-2', 'in_2', current_date, 1000, 190, 'eur', 'DE', 'Bob Jones', 'bob@example.org', '2 Bob Street');
INSERT INTO projects VALUES (10, 1, 'Alice Smith portfolio', now()), (20, 2, 'Bob site', now());
INSERT INTO project_members VALUES (20, 1, 'editor'), (20, 2, 'owner');
INSERT INTO documents (id, project_id, author_account_id, title, body, created_at, updated_at) VALUES
  (100, 10, 1, 'About me', 'I am Alice Smith, call +49 170 1111111', now(), now()),
  (200, 20, 1, 'Draft by Alice', 'Written by alice.smith@example.com', now(), now()),
  (201, 20, 2, 'Notes', 'Met Alice Smithson; the server 10.0.0.90 is down', now(), now());
INSERT INTO assets VALUES (1000, 10, 'cv.pdf', 'application/pdf', 10, 'accounts/1/assets/1000/cv.pdf', now()),
                          (2000, 20, 'logo.png', 'image/png', 10, 'accounts/2/assets/2000/logo.png', now());
INSERT INTO asset_versions VALUES (1, 1000, 1, 'v1', now(), '10.0.0.9'), (2, 2000, 1, 'v1', now(), '10.0.0.90');
INSERT INTO support_tickets VALUES (1, 1, 'Invoice for Alice Smith', 'open', now());
INSERT INTO support_messages VALUES (1, 1, false, 'Please mail alice.smith@example.com', now());
INSERT INTO page_views VALUES (1, 1, '/', now(), 's1'), (2, 2, '/', now(), 's2');
INSERT INTO devices VALUES (1, 1, 'dev-alice-1', 'firefox', 'linux', '1x1', now()),
                           (2, 2, 'dev-bob-2', 'safari', 'macos', '1x1', now());
INSERT INTO access_logs VALUES
  (1, 1, '10.0.0.9', now(), 'GET', '/', 200, 'https://x.example/?email=alice.smith%40example.com'),
  (2, 2, '10.0.0.90', now(), 'GET', '/', 200, 'https://x.example/?q=10.0.0.90');
INSERT INTO error_logs VALUES (1, 1, now(), 'error', 'login failed for alice.smith@example.com', '10.0.0.9'),
                              (2, NULL, now(), 'error', 'timeout from 10.0.0.90', '10.0.0.90');
"""

# Alice's account row, for tests that put it back.
ALICE_ACCOUNT = """
INSERT INTO accounts (id, email, full_name, password_hash, phone, plan, created_at)
VALUES (1, 'Alice.Smith@example.com', 'Alice Smith', 'h', '+49 170 1111111', 'pro', now())
"""

# What an erasure of Alice does, by hand: delete what she owns, anonymise what she wrote in Bob's project, keep
# her invoice for tax law under her pseudonym only.
ERASE_ALICE = f"""
DELETE FROM error_logs WHERE account_id = 1;
DELETE FROM access_logs WHERE account_id = 1;
DELETE FROM devices WHERE account_id = 1;
DELETE FROM page_views WHERE account_id = 1;
DELETE FROM support_messages WHERE ticket_id IN (SELECT id FROM support_tickets WHERE account_id = 1);
DELETE FROM support_tickets WHERE account_id = 1;
DELETE FROM asset_versions WHERE asset_id IN (SELECT id FROM assets WHERE project_id = 10);
DELETE FROM assets WHERE project_id = 10;
DELETE FROM documents WHERE project_id = 10;
UPDATE documents SET author_account_id = NULL, body = 'Written by [redacted]' WHERE author_account_id = 1;
DELETE FROM project_members WHERE account_id = 1;
DELETE FROM projects WHERE owner_account_id = 1;
UPDATE invoices SET account_id = NULL, billing_name = NULL, billing_address = NULL,
                    billing_email = '{ALICE_PSEUDONYM}' WHERE account_id = 1;
DELETE FROM billing_profiles WHERE account_id = 1;
DELETE FROM cookie_consents WHERE account_id = 1;
DELETE FROM preferences WHERE account_id = 1;
DELETE FROM accounts WHERE id = 1;
"""


# ---------------------------------------------------------------------------------------------------------------
# Fixtures: the session stack's PostgreSQL (conftest `engine`), with a fresh database for this module.
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sandbox(engine: Engine) -> Iterator[Engine]:
    """A fresh database with the sandbox schema, dropped at the end of the module."""
    admin = engine.execution_options(isolation_level="AUTOCOMMIT")  # CREATE DATABASE cannot run in a transaction
    name = f"test_checks_{uuid.uuid4().hex[:8]}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    fresh = create_engine(engine.url.set(database=name))
    metadata.create_all(fresh)
    yield fresh
    fresh.dispose()
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))


@pytest.fixture(scope="module")
def datamap() -> DataMap:
    return load_datamap(DATAMAP_PATH)


@pytest.fixture
def database_url(sandbox: Engine) -> str:
    """The URL of the sandbox, reseeded with Alice and Bob and Alice erased by hand."""
    tables = ", ".join(table.name for table in metadata.sorted_tables)
    with sandbox.begin() as connection:
        connection.exec_driver_sql(f"TRUNCATE {tables}")
        # exec_driver_sql hands the text to psycopg, which reads "%" as a placeholder: double it.
        connection.exec_driver_sql(SEED.replace("%", "%%"))
        connection.exec_driver_sql(ERASE_ALICE)
    return sandbox.url.render_as_string(hide_password=False)


def _execute(database_url: str, sql: str) -> None:
    engine = create_engine(database_url)
    with engine.begin() as connection:
        connection.execute(text(sql))
    engine.dispose()


def _s3(*keys: str) -> pd.DataFrame:
    """A listing of what is left in the content bucket: Bob's asset, plus `keys`."""
    listed = ["accounts/2/assets/2000/logo.png", *keys]
    return pd.DataFrame(
        {"key": listed, "version_id": [f"v{i}" for i in range(len(listed))], "is_delete_marker": False}
    )


def _stripe(*rows: dict[str, Any]) -> pd.DataFrame:
    """The customers left in Stripe: Bob's, plus `rows`."""
    bob = {"id": "cus_BOB2", "email": "bob@example.org", "name": "Bob Jones", "phone": "", "deleted": False}
    return pd.DataFrame([bob, *rows])


def _check(database_url: str, datamap: DataMap, **frames: pd.DataFrame) -> CheckResult:
    return erasure_checks(database_url, datamap, ALICE, frames.get("s3", _s3()), frames.get("stripe", _stripe()))


def _only_failure(result: CheckResult) -> Failure:
    assert not result.success
    assert len(result.failures) == 1, result.summary()
    return result.failures[0]


def _assert_no_values(*outputs: str) -> None:
    for output in outputs:
        lowered = output.lower()
        for value in ALICE_VALUES:
            assert value.lower() not in lowered, "one of Alice's values leaked"


# ---------------------------------------------------------------------------------------------------------------
# Erasure checks
# ---------------------------------------------------------------------------------------------------------------


def test_account_left_behind_fails(database_url: str, datamap: DataMap) -> None:
    _execute(database_url, ALICE_ACCOUNT)
    result = _check(database_url, datamap)
    failed = {(f.asset, f.column) for f in result.failures}
    assert {("accounts", "email"), ("accounts", "full_name"), ("accounts", "phone"), ("accounts", "id")} <= failed


def test_erased_subject_passes(database_url: str, datamap: DataMap) -> None:
    """Bob's "Alice Smithson" and 10.0.0.90 contain Alice's name and IP as substrings, but are not hers."""
    result = _check(database_url, datamap)
    assert result.success, result.summary()
    assert result.failures == ()
    assert result.expectations > 40  # every mapped table, S3 and Stripe were checked


def test_email_in_another_persons_document_fails(database_url: str, datamap: DataMap) -> None:
    _execute(database_url, "UPDATE documents SET body = body || ' cc ALICE.SMITH@example.com' WHERE id = 201")
    failure = _only_failure(_check(database_url, datamap))
    assert (failure.asset, failure.column, failure.check) == ("documents", "body", "mention")
    assert failure.unexpected_count == 1
    assert failure.expectation == "expect_column_values_to_not_match_regex"


def test_ip_in_an_anonymous_error_log_fails(database_url: str, datamap: DataMap) -> None:
    _execute(database_url, "INSERT INTO error_logs VALUES (3, NULL, now(), 'warn', 'retry', '10.0.0.9')")
    failure = _only_failure(_check(database_url, datamap))
    assert (failure.asset, failure.column, failure.check, failure.unexpected_count) == (
        "error_logs",
        "ip_address",
        "identifier",
        1,
    )


def test_phone_without_spaces_in_a_support_message_fails(database_url: str, datamap: DataMap) -> None:
    _execute(database_url, "INSERT INTO support_tickets VALUES (2, 2, 'Callback', 'open', now())")
    _execute(database_url, "INSERT INTO support_messages VALUES (2, 2, true, 'Call +491701111111.', now())")
    failure = _only_failure(_check(database_url, datamap))
    assert (failure.asset, failure.column, failure.unexpected_count) == ("support_messages", "body", 1)


def test_retained_invoice_must_hold_nothing_else(database_url: str, datamap: DataMap) -> None:
    _execute(
        database_url, f"UPDATE invoices SET billing_address = 'Road 1' WHERE billing_email = '{ALICE_PSEUDONYM}'"
    )
    failure = _only_failure(_check(database_url, datamap))
    assert (failure.asset, failure.column, failure.check) == ("invoices", "billing_address", "retained_row")
    assert failure.unexpected_count == 1


def test_retained_invoice_still_linked_to_the_account_fails(database_url: str, datamap: DataMap) -> None:
    _execute(database_url, ALICE_ACCOUNT)
    _execute(database_url, f"UPDATE invoices SET account_id = 1 WHERE billing_email = '{ALICE_PSEUDONYM}'")
    failed = {(f.asset, f.column, f.check) for f in _check(database_url, datamap).failures}
    assert ("invoices", "account_id", "account_id") in failed


def test_name_in_stripe_customers_fails(database_url: str, datamap: DataMap) -> None:
    leftover = {"id": "cus_OTHER", "email": "", "name": "ALICE SMITH", "phone": "", "deleted": False}
    failure = _only_failure(_check(database_url, datamap, stripe=_stripe(leftover)))
    assert (failure.asset, failure.column, failure.unexpected_count) == ("stripe_customers", "name", 1)


def test_deleted_stripe_customer_may_keep_its_id(database_url: str, datamap: DataMap) -> None:
    """Real Stripe still answers a deleted customer's id, with deleted: true and nothing else."""
    deleted = {"id": "cus_ALICE1", "email": None, "name": None, "phone": None, "deleted": True}
    assert _check(database_url, datamap, stripe=_stripe(deleted)).success
    live = deleted | {"deleted": False}
    failure = _only_failure(_check(database_url, datamap, stripe=_stripe(live)))
    assert (failure.asset, failure.column) == ("stripe_customers", "id")


def test_s3_version_left_under_the_prefix_fails(database_url: str, datamap: DataMap) -> None:
    failure = _only_failure(_check(database_url, datamap, s3=_s3("accounts/1/assets/1000/cv.pdf")))
    assert (failure.asset, failure.column, failure.check, failure.unexpected_count) == (
        "s3_versions",
        "key",
        "s3_prefix",
        1,
    )


def test_no_value_reaches_the_result_logs_or_output(
    database_url: str, datamap: DataMap, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run that finds leaks everywhere, with every logger at DEBUG and SQLAlchemy's SQL log on: names and counts
    only (bound parameters show as hidden)."""
    _execute(database_url, ALICE_ACCOUNT)
    _execute(database_url, "UPDATE documents SET body = 'alice.smith@example.com' WHERE id = 201")
    gx_level = logging.getLogger("great_expectations").level
    with caplog.at_level(logging.DEBUG), caplog.at_level(logging.INFO, logger="sqlalchemy.engine"):
        result = _check(
            database_url,
            datamap,
            s3=_s3("accounts/1/Alice Smith.pdf"),
            stripe=_stripe(
                {
                    "id": "cus_ALICE1",
                    "email": "Alice.Smith@example.com",
                    "name": "Alice Smith",
                    "phone": "+49 170 1111111",
                    "deleted": False,
                }
            ),
        )
    captured = capsys.readouterr()
    assert {f.asset for f in result.failures} >= {"accounts", "documents", "s3_versions", "stripe_customers"}
    _assert_no_values(repr(result), json.dumps(result.summary()), caplog.text, captured.out, captured.err)
    assert captured.out == "" and captured.err == ""  # no progress bars, no prints
    assert not [r for r in caplog.records if r.name.startswith("great_expectations")]  # silenced while it runs
    assert any(r.name.startswith("sqlalchemy.engine") for r in caplog.records)  # the SQL log was on
    _assert_no_values(*(str(record.args) for record in caplog.records), repr(ALICE), str(ALICE))
    assert logging.getLogger("great_expectations").level == gx_level  # restored
    assert not Path("gx").exists()  # the ephemeral context wrote no project to the working directory


def test_missing_column_is_an_error_without_its_message(database_url: str, datamap: DataMap) -> None:
    data = datamap.model_dump(by_alias=True)
    data["postgres"]["tables"]["error_logs"]["columns"]["client_ip"] = {"kind": "ip", "identifier": True}
    result = _check(database_url, DataMap.model_validate(data))
    assert not result.success
    errors = [f for f in result.failures if f.error]
    assert errors and all(f.asset == "error_logs" and f.unexpected_count is None for f in errors)
    assert all(re.fullmatch(r"[\w.]+", f.error or "") for f in errors)  # a class name, not a message
    assert any(f.error == "psycopg.errors.UndefinedColumn" for f in errors)  # the root cause, not GX's wrapper


# ---------------------------------------------------------------------------------------------------------------
# Patterns (the same regex the checks use, run by PostgreSQL itself)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sample", "mention"),
    [
        ("Hi ALICE SMITH!", True),
        ("alice smith's notes", True),
        ("Alice Smithson", False),
        ("MalICE SMITH", False),
        ("ip=10.0.0.9, port 80", True),
        ("ip=10.0.0.90", False),
        ("110.0.0.9", False),
        ("?e=alice.smith%40example.com&x", True),
        ("Alice.Smith@Example.COM", True),
        ("+49 170 1111111", True),
        ("tel:491701111111", True),
        ("tel:4917011111112", False),
        ("ref cus_ALICE1 done", True),
        ("nothing", False),
    ],
)
def test_text_pattern_in_postgres_and_python(sandbox: Engine, sample: str, mention: bool) -> None:
    postgres = text_pattern(ALICE, flavor="postgres")
    with sandbox.connect() as connection:
        assert (
            connection.execute(text("SELECT :sample ~ :pattern"), {"sample": sample, "pattern": postgres}).scalar()
            is mention
        )
    python = text_pattern(ALICE, flavor="python")
    assert python is not None
    assert (re.search(python, sample) is not None) is mention


def test_subject_identifiers_print_no_values_and_drop_blanks() -> None:
    subject = SubjectIdentifiers(emails=frozenset({"a@b.c", " ", ""}), names=frozenset({"Ann"}))
    assert subject.emails == {"a@b.c"}
    assert "a@b.c" not in repr(subject) and "Ann" not in str(subject)
    assert "emails=<1>" in repr(subject)
    assert text_pattern(SubjectIdentifiers()) is None


# ---------------------------------------------------------------------------------------------------------------
# Access package
# ---------------------------------------------------------------------------------------------------------------


def _manifest(*extra: dict[str, Any]) -> pd.DataFrame:
    rows = [
        {"table": "accounts", "category": "account", "account_id": 1, "rows": 1},
        {"table": "documents", "category": "content", "account_id": 1, "rows": 2},
        {"table": "documents", "category": "content", "account_id": None, "rows": 1},  # a mention in Bob's data
    ]
    return pd.DataFrame([*rows, *extra])


def test_access_package_of_the_subject_passes() -> None:
    result = access_package_checks(_manifest(), {1})
    assert result.success, result.summary()
    assert result.expectations == 7


@pytest.mark.parametrize(
    ("row", "column"),
    [
        ({"table": "page_views", "category": "usage", "account_id": 2, "rows": 4}, "account_id"),
        ({"table": "page_views", "category": "usage", "account_id": 1, "rows": -1}, "rows"),
        ({"table": "page_views", "category": "hobbies", "account_id": 1, "rows": 1}, "category"),
        ({"table": "", "category": "usage", "account_id": 1, "rows": 1}, "table"),
    ],
)
def test_access_package_with_a_wrong_row_fails(row: dict[str, Any], column: str) -> None:
    failure = _only_failure(access_package_checks(_manifest(row), {1}))
    assert (failure.asset, failure.column, failure.unexpected_count) == ("manifest", column, 1)


def test_access_package_without_accounts_holds_only_mentions() -> None:
    assert not access_package_checks(_manifest(), set()).success
    mentions = _manifest().query("account_id.isnull()")
    assert access_package_checks(mentions, set()).success

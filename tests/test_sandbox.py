"""The sandbox CellCMS on real servers: migrations, and seeding PostgreSQL, S3 (moto) and Stripe (localstripe).

Uses the session stack of tests/conftest.py (`engine`, `s3`, `stripe_client`); each test seeds a database of its
own on that server and a bucket of its own, so nothing here depends on, or disturbs, other tests' data.
Only PostgreSQL, S3 and Stripe are needed: `pytest tests/test_sandbox.py --stack-services=postgres,s3,stripe`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import Engine

from cellcms_sandbox import schema
from cellcms_sandbox.database import alembic_config, current_revision, migrate, sqlalchemy_url
from cellcms_sandbox.generator import SandboxNotEmptyError, SeedReport, seed_sandbox
from cellcms_sandbox.hard_cases import OTHER_HARD_CASES, SUBJECT_HARD_CASES, demo_subjects, hard_case_counts
from cellcms_sandbox.synthetic import (
    COLUMNS,
    FLAGGED_MINOR_ACCOUNT_ID,
    HARD_CASE_ACCOUNT_IDS,
    LONG_GONE_CUSTOMER_ACCOUNT_ID,
    SOFT_DELETED_ACCOUNT_ID,
    UNFLAGGED_MINOR_ACCOUNT_ID,
    account_ip,
)

if TYPE_CHECKING:
    import stripe
    from mypy_boto3_s3 import S3Client

ACCOUNTS = 200
SEED = 42
# One fixed "now" for the module: data dates are relative to it, and two runs must agree even across midnight.
NOW = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)

NewDatabase = Callable[[], str]


# ---------------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def new_database(engine: Engine) -> Iterator[NewDatabase]:
    """Creates empty databases on the stack's server (returning their URLs); drops them after the module."""
    created: list[str] = []

    def make() -> str:
        name = f"sandbox_{uuid.uuid4().hex[:12]}"
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as admin:
            admin.execute(text(f'CREATE DATABASE "{name}"'))
        created.append(name)
        return engine.url.set(database=name).render_as_string(hide_password=False)

    yield make
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as admin:
        for name in created:
            admin.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _new_bucket() -> str:
    return f"sandbox-test-{uuid.uuid4().hex[:12]}"


@dataclass(frozen=True)
class Seeded:
    url: str
    bucket: str
    report: SeedReport
    engine: Engine


@pytest.fixture(scope="module")
def seeded(new_database: NewDatabase, s3: S3Client, stripe_client: stripe.StripeClient) -> Iterator[Seeded]:
    """200 accounts seeded into PostgreSQL, S3 and Stripe with the default caps (which cover all 200)."""
    url, bucket = new_database(), _new_bucket()
    report = seed_sandbox(url, s3, stripe_client, bucket, ACCOUNTS, seed=SEED, now=NOW, progress=False)
    engine = create_engine(sqlalchemy_url(url))
    yield Seeded(url, bucket, report, engine)
    engine.dispose()


def _rows(engine: Engine, query: str, **params: Any) -> list[Any]:
    with engine.connect() as connection:
        return list(connection.execute(text(query), params).all())


def _scalar(engine: Engine, query: str, **params: Any) -> Any:
    with engine.connect() as connection:
        return connection.execute(text(query), params).scalar_one()


def _s3_versions(s3: S3Client, bucket: str, prefix: str = "accounts/") -> list[dict[str, Any]]:
    versions: list[dict[str, Any]] = []
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=prefix):
        versions.extend(page.get("Versions", []))
    return versions


# ---------------------------------------------------------------------------------------------------------------
# Without servers


def test_generated_columns_are_exactly_the_schema_columns() -> None:
    assert set(COLUMNS) == set(schema.metadata.tables)
    for name, table in schema.metadata.tables.items():
        assert sorted(COLUMNS[name]) == sorted(column.name for column in table.columns), name


def test_account_ips_are_unique_and_never_from_the_noise_ranges() -> None:
    ips = [account_ip(SEED, account_id, slot) for account_id in range(1, 50_001) for slot in (0, 1)]
    assert len(set(ips)) == len(ips)
    assert not [ip for ip in ips if ip.startswith(("192.0.2.", "198.51.100.", "203.0.113.", "10.", "127."))]


# ---------------------------------------------------------------------------------------------------------------
# Migrations


def test_migrate_creates_exactly_the_schema_and_is_idempotent(new_database: NewDatabase) -> None:
    url = new_database()
    assert current_revision(url) is None
    migrate(url)
    migrate(url)  # a second run is a no-op

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert current_revision(url) == head
    engine = create_engine(sqlalchemy_url(url))
    try:
        assert set(inspect(engine).get_table_names()) == set(schema.metadata.tables) | {"alembic_version"}
        with engine.connect() as connection:
            context = MigrationContext.configure(
                connection, opts={"compare_type": True, "compare_server_default": True}
            )
            # Columns, types, nullability, defaults, keys, unique constraints and indexes all match schema.py.
            assert compare_metadata(context, schema.metadata) == []
    finally:
        engine.dispose()


# ---------------------------------------------------------------------------------------------------------------
# Seeding


def test_report_matches_the_database(seeded: Seeded) -> None:
    report = seeded.report
    assert report.accounts == ACCOUNTS
    for table in schema.metadata.tables:
        assert _scalar(seeded.engine, f"SELECT count(*) FROM {table}") == report.rows[table], table
    # Roughly the volumes asked for.
    assert 1 * ACCOUNTS <= report.rows["projects"] <= 3 * ACCOUNTS
    assert 10 * ACCOUNTS <= report.rows["page_views"] <= 30 * ACCOUNTS
    assert 5 * ACCOUNTS <= report.rows["access_logs"] <= 20 * ACCOUNTS
    assert report.rows["cookie_consents"] == 3 * ACCOUNTS
    assert report.rows["preferences"] == ACCOUNTS
    assert report.rows["asset_versions"] > report.rows["assets"]
    assert report.stripe_customers == report.rows["billing_profiles"] > 0
    assert report.s3_object_versions == report.rows["asset_versions"]


def test_same_seed_gives_the_same_data_and_another_seed_does_not(
    seeded: Seeded, new_database: NewDatabase
) -> None:
    # Without S3 and Stripe this time: the caps change plans and billing, never the people or their content.
    again, other = new_database(), new_database()
    seed_sandbox(again, None, None, "unused", ACCOUNTS, seed=SEED, now=NOW, progress=False)
    seed_sandbox(other, None, None, "unused", ACCOUNTS, seed=SEED + 1, now=NOW, progress=False)
    queries = [
        "SELECT id, email, full_name, phone, birth_date, created_at, deleted_at FROM accounts ORDER BY id",
        "SELECT id, project_id, author_account_id, title, body, created_at FROM documents ORDER BY id",
        "SELECT id, ticket_id, body, sent_at FROM support_messages ORDER BY id",
        "SELECT id, account_id, host(ip_address), referrer, accessed_at FROM access_logs ORDER BY id",
        "SELECT id, account_id, message, host(ip_address) FROM error_logs ORDER BY id",
    ]
    engine_again, engine_other = create_engine(sqlalchemy_url(again)), create_engine(sqlalchemy_url(other))
    try:
        for query in queries:
            assert _rows(seeded.engine, query) == _rows(engine_again, query), query
        emails = {row[0] for row in _rows(seeded.engine, "SELECT email FROM accounts")}
        other_emails = {row[0] for row in _rows(engine_other, "SELECT email FROM accounts")}
        assert len(emails) == ACCOUNTS
        assert not emails & other_emails
        # Without the services: no billing profile (no customer to point at), no S3 version ids.
        assert _scalar(engine_again, "SELECT count(*) FROM billing_profiles") == 0
        assert _scalar(engine_again, "SELECT count(*) FROM asset_versions WHERE s3_version_id IS NOT NULL") == 0
    finally:
        engine_again.dispose()
        engine_other.dispose()


def test_every_hard_case_exists(seeded: Seeded) -> None:
    counts = hard_case_counts(seeded.url)
    for name in SUBJECT_HARD_CASES:
        assert counts[name] >= len(HARD_CASE_ACCOUNT_IDS), name
    for name in OTHER_HARD_CASES:
        assert counts[name] >= 1, name


def test_accounts_1_to_10_carry_every_hard_case(seeded: Seeded) -> None:
    hard_cases = list(HARD_CASE_ACCOUNT_IDS)
    assert demo_subjects(seeded.url, limit=None)[: len(hard_cases)] == hard_cases
    engine = seeded.engine
    for account_id in hard_cases:
        email, full_name = _rows(engine, "SELECT email, full_name FROM accounts WHERE id = :a", a=account_id)[0]
        # A collaborator in another account's project, authoring documents there; the host's text names them.
        host_documents = _rows(
            engine,
            """SELECT d.author_account_id, d.body FROM documents d
               JOIN projects p ON p.id = d.project_id
               JOIN project_members m ON m.project_id = p.id AND m.account_id = :a AND m.role = 'editor'
               WHERE p.owner_account_id <> :a""",
            a=account_id,
        )
        assert any(author == account_id and email in body for author, body in host_documents)
        assert any(author != account_id and full_name in body for author, body in host_documents)
        # An error log without account whose message names them and whose IP is theirs.
        assert _scalar(
            engine,
            """SELECT count(*) FROM error_logs e
               WHERE e.account_id IS NULL AND strpos(e.message, :email) > 0
                 AND e.ip_address IN (SELECT ip_address FROM cookie_consents WHERE account_id = :a)""",
            email=email,
            a=account_id,
        )
        # Referrers carrying their IP and their email.
        referrers = [
            row[0] for row in _rows(engine, "SELECT referrer FROM access_logs WHERE account_id = :a", a=account_id)
        ]
        ip = _scalar(
            engine, "SELECT DISTINCT host(ip_address) FROM cookie_consents WHERE account_id = :a", a=account_id
        )
        assert f"http://{ip}:8080/preview" in referrers
        assert f"https://app.cellcms.com/login?email={email}" in referrers
        # Support messages reachable only through their ticket, naming them.
        assert _scalar(
            engine,
            """SELECT count(*) FROM support_messages m JOIN support_tickets t ON t.id = m.ticket_id
               WHERE t.account_id = :a AND strpos(m.body, :email) > 0""",
            a=account_id,
            email=email,
        )
        assert _scalar(
            engine,
            "SELECT count(*) FROM survey_responses WHERE account_id = :a AND strpos(free_text, :name) > 0",
            a=account_id,
            name=full_name,
        )
        # Asset versions reachable only through assets -> projects, several for one asset.
        assert (
            _scalar(
                engine,
                """SELECT max(n) FROM (
                     SELECT count(*) AS n FROM asset_versions v JOIN assets s ON s.id = v.asset_id
                     JOIN projects p ON p.id = s.project_id WHERE p.owner_account_id = :a GROUP BY s.id
                   ) AS per_asset""",
                a=account_id,
            )
            >= 2
        )
        assert _scalar(engine, "SELECT count(*) FROM invoices WHERE account_id = :a", a=account_id) >= 3
        assert _scalar(engine, "SELECT count(*) FROM billing_profiles WHERE account_id = :a", a=account_id) == 1


def test_population_hard_cases_at_fixed_ids(seeded: Seeded) -> None:
    engine = seeded.engine

    def account(account_id: int) -> Any:
        return _rows(
            engine,
            """SELECT birth_date > current_date - interval '16 years' AS under_16, is_minor_flagged, deleted_at
               FROM accounts WHERE id = :a""",
            a=account_id,
        )[0]

    assert tuple(account(UNFLAGGED_MINOR_ACCOUNT_ID)[:2]) == (True, False)
    assert tuple(account(FLAGGED_MINOR_ACCOUNT_ID)[:2]) == (True, True)
    assert account(SOFT_DELETED_ACCOUNT_ID).deleted_at is not None
    assert _scalar(
        engine, "SELECT count(*) FROM documents WHERE author_account_id = :a", a=SOFT_DELETED_ACCOUNT_ID
    )
    newest, billing = _rows(
        engine,
        """SELECT max(issued_at), (SELECT count(*) FROM billing_profiles WHERE account_id = :a)
           FROM invoices WHERE account_id = :a""",
        a=LONG_GONE_CUSTOMER_ACCOUNT_ID,
    )[0]
    assert billing == 0
    assert newest < NOW.date().replace(year=NOW.year - 7)


def test_s3_holds_every_asset_version_of_the_database(seeded: Seeded, s3: S3Client) -> None:
    database = {
        (key, version_id)
        for key, version_id in _rows(
            seeded.engine,
            "SELECT s.s3_key, v.s3_version_id FROM asset_versions v JOIN assets s ON s.id = v.asset_id",
        )
    }
    versions = _s3_versions(s3, seeded.bucket)
    assert {(v["Key"], v["VersionId"]) for v in versions} == database
    assert s3.get_bucket_versioning(Bucket=seeded.bucket)["Status"] == "Enabled"

    # The newest version number is S3's current version, and its content is the account's.
    key, version_id, full_name = _rows(
        seeded.engine,
        """SELECT s.s3_key, v.s3_version_id, a.full_name FROM asset_versions v
           JOIN assets s ON s.id = v.asset_id JOIN projects p ON p.id = s.project_id
           JOIN accounts a ON a.id = p.owner_account_id
           WHERE p.owner_account_id = 1 AND v.version_number = 2 ORDER BY v.id LIMIT 1""",
    )[0]
    assert key.startswith("accounts/1/assets/")
    current = s3.get_object(Bucket=seeded.bucket, Key=key)
    assert current["VersionId"] == version_id
    assert full_name in current["Body"].read().decode()
    assert len([v for v in versions if v["Key"] == key]) == 2


def test_stripe_holds_every_billing_profile_customer(seeded: Seeded, stripe_client: stripe.StripeClient) -> None:
    profiles = _rows(seeded.engine, "SELECT account_id, stripe_customer_id, billing_email FROM billing_profiles")
    assert len(profiles) == seeded.report.stripe_customers
    for account_id, customer_id, billing_email in profiles:
        customer = stripe_client.v1.customers.retrieve(customer_id).to_dict()
        assert customer["email"] == billing_email
        assert customer["metadata"]["cellcms_account_id"] == str(account_id)
    linked = _rows(
        seeded.engine,
        """SELECT i.stripe_invoice_id, b.stripe_customer_id FROM invoices i
           JOIN billing_profiles b ON b.account_id = i.account_id WHERE i.stripe_invoice_id IS NOT NULL""",
    )
    assert len(linked) == len(profiles)  # the newest invoice of every customer
    for invoice_id, customer_id in linked[:20]:
        assert stripe_client.v1.invoices.retrieve(invoice_id).to_dict()["customer"] == customer_id


def test_seeding_a_seeded_sandbox_needs_reset(
    new_database: NewDatabase, s3: S3Client, stripe_client: stripe.StripeClient
) -> None:
    import stripe

    url, bucket = new_database(), _new_bucket()
    first = seed_sandbox(url, s3, stripe_client, bucket, 25, seed=SEED, now=NOW, progress=False)
    engine = create_engine(sqlalchemy_url(url))
    try:
        old_customers = [row[0] for row in _rows(engine, "SELECT stripe_customer_id FROM billing_profiles")]
        assert old_customers

        with pytest.raises(SandboxNotEmptyError, match="reset=True"):
            seed_sandbox(url, s3, stripe_client, bucket, 25, seed=SEED, now=NOW, progress=False)

        second = seed_sandbox(url, s3, stripe_client, bucket, 25, seed=SEED, now=NOW, progress=False, reset=True)
        assert second.rows == first.rows
        for customer_id in old_customers:  # the previous run's customers are gone
            with pytest.raises(stripe.InvalidRequestError):
                stripe_client.v1.customers.retrieve(customer_id)
        # Only this run's object versions remain; the sequences continue after the explicit ids.
        assert len(_s3_versions(s3, bucket)) == second.rows["asset_versions"]
        with engine.begin() as connection:
            new_id = connection.execute(
                text(
                    "INSERT INTO feature_usage (account_id, feature, used_at) VALUES (1, 'x', now()) RETURNING id"
                )
            ).scalar_one()
        assert new_id == second.rows["feature_usage"] + 1
    finally:
        engine.dispose()


def test_a_failed_seed_leaves_nothing_behind(
    new_database: NewDatabase,
    s3: S3Client,
    stripe_client: stripe.StripeClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import stripe

    from cellcms_sandbox.stripe_billing import StripeSeeder

    created: list[str] = []
    original = StripeSeeder.create_customer

    def failing_after_three(self: StripeSeeder, customer: Any) -> tuple[str, str | None]:
        if len(created) == 3:
            raise RuntimeError("Stripe went away")
        result = original(self, customer)
        created.append(result[0])
        return result

    monkeypatch.setattr(StripeSeeder, "create_customer", failing_after_three)
    url, bucket = new_database(), _new_bucket()
    with pytest.raises(RuntimeError, match="Stripe went away"):
        seed_sandbox(url, s3, stripe_client, bucket, 60, seed=SEED, now=NOW, progress=False)

    engine = create_engine(sqlalchemy_url(url))
    try:
        for table in schema.metadata.tables:  # one transaction: rolled back as a whole
            assert _scalar(engine, f"SELECT count(*) FROM {table}") == 0, table
        with engine.connect() as connection:  # the dropped indexes and foreign keys are back
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, schema.metadata) == []
    finally:
        engine.dispose()
    assert _s3_versions(s3, bucket) == []
    for customer_id in created:
        with pytest.raises(stripe.InvalidRequestError):
            stripe_client.v1.customers.retrieve(customer_id)

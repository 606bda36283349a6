"""Nightly retention against the real local stack: each rule's end state in PostgreSQL, S3 and Stripe, legal holds,
dry run = real run, resume after a crash without double counting, the Great Expectations proof, bad input.

The sandbox is seeded once for this module (40 accounts); tests run in file order and build on each other: the
first ones change nothing, the main run acts, later ones look at its end state. The clock is the `as_of` date;
accounts are moved in time by setting their deleted_at relative to it.
"""

from __future__ import annotations

import dataclasses
import html
import re
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import stripe
from sqlalchemy import Engine, text

from cellcms_sandbox.database import migrate
from cellcms_sandbox.generator import seed_sandbox
from flows.nightly_retention import RetentionRun, nightly_retention
from privacy_ops import checks, data_docs, retention
from privacy_ops.datamap import load_datamap
from privacy_ops.datamap.loader import DataMapError
from privacy_ops.lifecycle import holds
from privacy_ops.services import reset_cache, services
from privacy_ops.settings import Settings, load_settings
from privacy_ops.stores import s3 as s3_store

ACCOUNTS = 40
TODAY = datetime.now(UTC).date()
RESUMED_RUN = "test-resumed-run"


@dataclasses.dataclass
class Plan:
    """Accounts the tests put in known states before the run."""

    deleted_long_ago: list[int]  # deleted 40 days before as_of: erased
    with_stripe: int  # one of them, with a Stripe customer and S3 objects
    deleted_recently: int  # deleted 10 days before as_of: inside the period, untouched
    held: int  # deleted 40 days ago but under legal hold: untouched
    minors: list[int]
    stripe_customer: str
    kept_document: int  # written by account 23 in a project that stays, naming its author: kept, redacted
    hold_id: int = 0


@pytest.fixture(scope="module")
def cellcms(stack: Any, engine: Engine, s3: Any, stripe_client: stripe.StripeClient) -> Iterator[Settings]:
    settings = load_settings()
    url = settings.database_url.get_secret_value()
    migrate(url)
    seed_sandbox(
        url,
        s3,
        stripe_client,
        settings.content_bucket,
        ACCOUNTS,
        reset=True,
        progress=False,
        s3_accounts=ACCOUNTS,
        stripe_accounts=ACCOUNTS,
    )
    reset_cache()
    services()
    yield settings
    reset_cache()


def _scalar(engine: Engine, sql: str, **params: Any) -> Any:
    with engine.connect() as connection:
        return connection.execute(text(sql), params).scalar()


def _ids(engine: Engine, sql: str, **params: Any) -> list[int]:
    with engine.connect() as connection:
        return [int(r) for r in connection.execute(text(sql), params).scalars()]


@pytest.fixture(scope="module")
def plan(cellcms: Settings, engine: Engine) -> Plan:
    adults = (
        "SELECT a.id FROM accounts a WHERE NOT a.is_minor_flagged "
        "AND (a.birth_date IS NULL OR a.birth_date < current_date - interval '17 years')"
    )
    with_stripe = _ids(
        engine,
        f"{adults} AND a.id IN (SELECT account_id FROM billing_profiles) "
        "AND a.id IN (SELECT owner_account_id FROM projects) ORDER BY a.id LIMIT 1",
    )[0]
    others = [
        i for i in _ids(engine, f"{adults} AND a.id NOT IN (21, 22, 23, 24) ORDER BY a.id") if i != with_stripe
    ]
    recently, held = others[-1], others[-2]
    long_ago = [23, with_stripe]
    with engine.begin() as connection:
        for account_id in [*long_ago, held]:
            connection.execute(
                text("UPDATE accounts SET deleted_at = :at WHERE id = :id"),
                {"at": datetime.combine(TODAY - timedelta(days=40), datetime.min.time(), UTC), "id": account_id},
            )
        connection.execute(
            text("UPDATE accounts SET deleted_at = :at WHERE id = :id"),
            {"at": datetime.now(UTC) - timedelta(days=10), "id": recently},
        )
        customer = connection.execute(
            text("SELECT stripe_customer_id FROM billing_profiles WHERE account_id = :id"), {"id": with_stripe}
        ).scalar_one()
        kept_document = connection.execute(
            text(
                "INSERT INTO documents (id, project_id, author_account_id, title, body, created_at, updated_at) "
                "SELECT (SELECT max(id) + 1 FROM documents), p.id, a.id, 'Notes by ' || a.full_name, "
                "'Ask ' || a.full_name || ' at ' || a.email || '.', now(), now() "
                "FROM accounts a, projects p WHERE a.id = 23 AND p.owner_account_id = :owner LIMIT 1 RETURNING id"
            ),
            {"owner": others[0]},
        ).scalar_one()
    minors = _ids(
        engine,
        "SELECT id FROM accounts WHERE is_minor_flagged OR birth_date > current_date - interval '16 years' "
        "ORDER BY id",
    )
    assert {21, 22} <= set(minors)
    return Plan(long_ago, with_stripe, recently, held, minors, customer, kept_document)


def _ctx(settings: Settings, run_id: str, as_of: date, **datamap_changes: Any) -> retention.Context:
    s = services()
    datamap = s.datamap
    if datamap_changes:
        assert datamap.retention is not None
        datamap = datamap.model_copy(update={"retention": datamap.retention.model_copy(update=datamap_changes)})
    return retention.Context(
        datamap=datamap,
        as_of=as_of,
        engine=s.engine,
        s3=s.s3,
        stripe=s.stripe,
        settings=s.settings,
        secret_key=s.secret_key,
        run_id=run_id,
    )


def _table_counts(engine: Engine) -> dict[str, int]:
    tables = [*services().datamap.postgres.tables, "privacy_ops.retained_records", "privacy_ops.legal_holds"]
    with engine.connect() as connection:
        counts = {t: int(connection.execute(text(f"SELECT count(*) FROM {t}")).scalar_one()) for t in tables}
        counts["old_full_ips"] = int(
            connection.execute(
                text("SELECT count(*) FROM access_logs WHERE masklen(ip_address) = 32 AND accessed_at < :c"),
                {"c": TODAY - timedelta(days=90)},
            ).scalar_one()
        )
    return counts


def _s3_versions(s3: Any, bucket: str, prefix: str) -> int:
    listed = 0
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=prefix):
        listed += len(page.get("Versions", [])) + len(page.get("DeleteMarkers", []))
    return listed


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_input_changes_nothing(cellcms: Settings, plan: Plan, engine: Engine, tmp_path: Path) -> None:
    before = _table_counts(engine)
    s = services()
    ctx = _ctx(cellcms, "bad-input", TODAY)

    with pytest.raises(retention.RetentionError, match=r"unknown retention rule.*no_such_rule.*known: "):
        retention.run_retention(ctx, ["no_such_rule"])
    with pytest.raises(retention.RetentionError, match="in the future"):
        retention.run_retention(dataclasses.replace(ctx, as_of=TODAY + timedelta(days=1)))
    with pytest.raises(ValueError, match="in the future"):
        RetentionRun(as_of=TODAY + timedelta(days=1))
    # A rule that would change more than max_share of its table stops before acting.
    with pytest.raises(retention.ApprovalRequired, match="page_views_without_consent would change") as raised:
        retention.apply_rule(ctx, "page_views_without_consent", max_share=0.01)
    assert raised.value.rows > 0

    with s.engine.begin() as connection, pytest.raises(holds.HoldError, match="no account 999999"):
        holds.place_hold(
            connection,
            s.datamap,
            secret_key=s.secret_key,
            account_id=999999,
            reason="litigation 7",
            placed_by="ops",
            now=datetime.now(UTC),
        )

    source = Path(s.settings.datamap_path).read_text(encoding="utf-8")
    broken = tmp_path / "negative.yaml"
    broken.write_text(source.replace("      period_days: 90\n", "      period_days: -90\n", 1), encoding="utf-8")
    with pytest.raises(DataMapError) as error:
        load_datamap(broken)
    line = source[: source.index("      period_days: 90\n")].count("\n") + 1
    assert f"negative.yaml:{line}: retention.rules.access_log_network_data.period_days: " in str(error.value)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(
        source.replace("categories: [content]", "categories: [contents]").replace(
            "clock_column: issued_at\n      period_days: 2557\n",
            "clock_column: paid_at\n      period_days: 2557\n",
        ),
        encoding="utf-8",
    )
    with pytest.raises(DataMapError) as error:
        load_datamap(unknown)
    assert "unknown value 'contents'" in str(error.value)
    assert "billing_records_7_years.clock_column: 'paid_at' is not a column of invoices" in str(error.value)

    assert _table_counts(engine) == before


def test_hold_is_placed_and_audited(cellcms: Settings, plan: Plan, engine: Engine) -> None:
    s = services()
    with s.engine.begin() as connection:
        plan.hold_id = holds.place_hold(
            connection,
            s.datamap,
            secret_key=s.secret_key,
            account_id=plan.held,
            reason="litigation case 7",
            placed_by="legal-team",
            now=datetime.now(UTC),
        )
        # A row hold: one old invoice of the long-gone customer stays past 7 years.
        invoice = connection.execute(text("SELECT min(id) FROM invoices WHERE account_id = 24")).scalar_one()
        holds.place_hold(
            connection,
            s.datamap,
            secret_key=s.secret_key,
            table="invoices",
            row_key=str(invoice),
            reason="tax audit 2026",
            placed_by="legal-team",
            now=datetime.now(UTC),
        )
    with s.engine.connect() as connection:
        active = holds.list_holds(connection)
        audited = connection.execute(
            text("SELECT count(*) FROM privacy_ops.audit_log WHERE step = 'legal_hold' AND outcome = 'placed'")
        ).scalar_one()
    assert {h.scope for h in active} == {"account", "row"}
    assert audited == 2


# ------------------------------------------------------------------------------------- dry run, crash, run
def test_dry_run_then_crashed_run_resumed(
    cellcms: Settings, plan: Plan, engine: Engine, s3: Any, read_mail: Callable[[], list[EmailMessage]]
) -> None:
    before = _table_counts(engine)
    versions_before = _s3_versions(s3, cellcms.content_bucket, f"accounts/{plan.with_stripe}/")
    assert versions_before > 0 and before["old_full_ips"] > 0

    preview = nightly_retention(RetentionRun(dry_run=True, as_of=TODAY, max_share=1.0))
    assert _table_counts(engine) == before, "a dry run changes nothing"
    assert _s3_versions(s3, cellcms.content_bucket, f"accounts/{plan.with_stripe}/") == versions_before
    expected = {r["rule"]: r for r in preview}
    assert expected["access_log_network_data"]["selected"] > 40

    # A crash: the content rule died after its first batch of one account, was resumed and finished; so did the
    # rules up to the log rule, which acted on two batches of 20 rows, then the process died. The flow resumes the
    # same retention run.
    mail_before = len(read_mail())
    one_by_one = _ctx(cellcms, RESUMED_RUN, TODAY, batch_size=1)
    first = retention.apply_rule(one_by_one, "deleted_account_content", max_share=1.0, max_batches=1)
    assert first.selected == 1
    crashed = _ctx(cellcms, RESUMED_RUN, TODAY, batch_size=20)
    names = retention.rule_names(crashed.datamap)
    for name in names[: names.index("access_log_network_data")]:
        retention.apply_rule(crashed, name, max_share=1.0)
    partial = retention.apply_rule(crashed, "access_log_network_data", max_share=1.0, max_batches=2)
    assert partial.selected == 40

    reports = nightly_retention(RetentionRun(as_of=TODAY, max_share=1.0, resume_run_id=RESUMED_RUN))
    actual = {r["rule"]: r for r in reports}
    for rule, preview_report in expected.items():
        if rule in ("expired_export_packages", "expired_unverified_requests"):
            continue  # S3 exports and requests: tested below, with their own clock
        assert actual[rule]["selected"] == preview_report["selected"], rule
        assert actual[rule]["stores"] == preview_report["stores"], rule
        assert actual[rule]["tables"] == preview_report["tables"], rule
    assert actual["access_log_network_data"]["resumed_batches"] == 2
    # The content rule's rescan passed over the account its first batch had finished: counted once.
    assert actual["deleted_account_content"]["resumed_batches"] == 2

    with engine.connect() as connection:
        keys = (
            connection.execute(
                text("SELECT idempotency_key FROM privacy_ops.audit_log WHERE idempotency_key LIKE :k"),
                {"k": f"retention:{RESUMED_RUN}:access_log_network_data:%"},
            )
            .scalars()
            .all()
        )
    assert len(keys) == len(set(keys)) == actual["access_log_network_data"]["batches"] + 2

    # Each minor was told (where an address is on file), and compliance ops got one summary.
    subjects = [str(m["Subject"]) for m in read_mail()[mail_before:]]
    assert subjects.count("Your CellCMS account has been deleted") == actual["minors"]["stores"]["email"] > 0
    assert sum("nightly retention run" in s for s in subjects) == 1

    # A second run finds nothing left to do.
    again = nightly_retention(RetentionRun(as_of=TODAY, max_share=1.0))
    assert all(r["selected"] == 0 for r in again), [r for r in again if r["selected"]]


def test_end_state(
    cellcms: Settings, plan: Plan, engine: Engine, s3: Any, stripe_client: stripe.StripeClient
) -> None:
    cutoff = TODAY - timedelta(days=30)
    # Deleted accounts past 30 days and minors: gone everywhere. Inside the period or held: untouched.
    gone = [*plan.deleted_long_ago, *plan.minors]
    assert _ids(engine, "SELECT id FROM accounts WHERE id = ANY(:ids)", ids=gone) == []
    assert _scalar(engine, "SELECT count(*) FROM accounts WHERE deleted_at < :c", c=cutoff) == 1  # the held one
    for account_id in gone:
        assert _scalar(engine, "SELECT count(*) FROM projects WHERE owner_account_id = :i", i=account_id) == 0
        assert _scalar(engine, "SELECT count(*) FROM documents WHERE author_account_id = :i", i=account_id) == 0
        assert _s3_versions(s3, cellcms.content_bucket, f"accounts/{account_id}/") == 0
    with pytest.raises(stripe.InvalidRequestError):
        stripe_client.v1.customers.retrieve(plan.stripe_customer)
    # A document the deleted account wrote in a project that stays: kept, without its author, and redacted of the
    # author's own identifiers.
    with engine.connect() as connection:
        author, title, body = connection.execute(
            text("SELECT author_account_id, title, body FROM documents WHERE id = :id"), {"id": plan.kept_document}
        ).one()
    assert author is None
    assert (title, body) == ("Notes by [redacted]", "Ask [redacted] at [redacted].")
    for account_id in (plan.deleted_recently, plan.held):
        assert _scalar(engine, "SELECT count(*) FROM accounts WHERE id = :i", i=account_id) == 1
        assert _scalar(engine, "SELECT count(*) FROM page_views WHERE account_id = :i", i=account_id) >= 0
        assert _scalar(engine, "SELECT count(*) FROM projects WHERE owner_account_id = :i", i=account_id) > 0
        assert _s3_versions(s3, cellcms.content_bucket, f"accounts/{account_id}/") > 0

    # Billing past 7 years purged (and unlisted from retained_records), but the held invoice stays.
    old = TODAY - timedelta(days=2557)
    assert _scalar(engine, "SELECT count(*) FROM invoices WHERE issued_at < :d", d=old) == 1
    assert (
        _scalar(
            engine,
            "SELECT count(*) FROM privacy_ops.retained_records WHERE table_name = 'invoices' "
            "AND row_key NOT IN (SELECT id::text FROM invoices)",
        )
        == 0
    )

    # Logs past 90 days: IPs truncated, referrers gone; recent logs keep their full IP.
    log_cutoff = datetime.combine(TODAY - timedelta(days=90), datetime.min.time(), UTC)
    assert (
        _scalar(
            engine,
            "SELECT count(*) FROM access_logs WHERE accessed_at < :c AND account_id <> :held "
            "AND (masklen(ip_address) > 24 OR referrer IS NOT NULL)",
            c=log_cutoff,
            held=plan.held,
        )
        == 0
    )
    assert (
        _scalar(
            engine,
            "SELECT count(*) FROM access_logs WHERE accessed_at >= :c AND masklen(ip_address) = 32",
            c=log_cutoff,
        )
        > 0
    )
    assert (
        _scalar(
            engine,
            "SELECT count(*) FROM error_logs WHERE occurred_at < :c AND message ~ '@' "
            "AND account_id IS DISTINCT FROM :held",
            c=log_cutoff,
            held=plan.held,
        )
        == 0
    )

    # Usage data only where analytics cookies were granted.
    for table in ("page_views", "feature_usage", "api_call_counts"):
        assert (
            _scalar(
                engine,
                f"SELECT count(*) FROM {table} t WHERE NOT EXISTS (SELECT 1 FROM cookie_consents c "
                "WHERE c.account_id = t.account_id AND c.category = 'analytics' AND c.granted)",
            )
            == 0
        )
        assert _scalar(engine, f"SELECT count(*) FROM {table}") > 0


def test_exports_and_unverified_requests(cellcms: Settings, engine: Engine, s3: Any) -> None:
    bucket = cellcms.export_bucket
    if bucket not in {b["Name"] for b in s3.list_buckets()["Buckets"]}:
        s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": cellcms.s3_region})
    s3_store.purge_prefix(s3, bucket, "exports/")  # packages of earlier test modules would be counted too
    s3.put_object(Bucket=bucket, Key="exports/req_retention01/access-package-req_retention01.zip", Body=b"zip")
    now = datetime.now(UTC)
    with engine.begin() as connection:
        connection.execute(
            text(
                'INSERT INTO privacy_ops.requests (id, "right", regulation, status, subject_hash, '
                "received_at, due_at, "
                "requested_by) VALUES ('req_retention02', 'access', 'GDPR', "
                "'awaiting_verification', 'h', :r, :d, 't')"
            ),
            {"r": now - timedelta(days=3), "d": now + timedelta(days=27)},
        )
        connection.execute(
            text(
                "INSERT INTO privacy_ops.verifications (request_id, method, status, expires_at, updated_at) "
                "VALUES ('req_retention02', 'email_code', 'pending', :e, :e)"
            ),
            {"e": now - timedelta(days=2)},
        )
        # What an erasure keeps while it waits for the code (encrypted); its run died suspended.
        connection.execute(
            text(
                "INSERT INTO privacy_ops.subject_snapshots (request_id, payload, created_at) "
                "VALUES ('req_retention02', '\\x00', :r)"
            ),
            {"r": now - timedelta(days=3)},
        )
    report = retention.apply_rule(_ctx(cellcms, "requests", TODAY), "expired_unverified_requests")
    assert report.selected == 1
    assert report.tables["privacy_ops.subject_snapshots"] == 1
    assert (
        _scalar(engine, "SELECT count(*) FROM privacy_ops.subject_snapshots WHERE request_id = 'req_retention02'")
        == 0
    )
    assert _scalar(engine, "SELECT status FROM privacy_ops.requests WHERE id = 'req_retention02'") == "denied"
    assert _scalar(
        engine, "SELECT status FROM privacy_ops.verifications WHERE request_id = 'req_retention02'"
    ) == ("expired")

    # The exports rule runs on the object's own clock: a run dated 8 days ahead (the functions take any date;
    # the flow and run_retention refuse future dates) sees the package as 8 days old.
    ahead = _ctx(cellcms, "exports", TODAY + timedelta(days=8))
    assert retention.export_leftovers(ahead, ["expired_export_packages"]) == ["exports/req_retention01/"]
    today_report = retention.apply_rule(_ctx(cellcms, "exports-today", TODAY), "expired_export_packages")
    assert today_report.selected == 0
    report = retention.apply_rule(ahead, "expired_export_packages")
    assert (report.selected, report.stores["s3"]) == (1, 1)
    assert _s3_versions(s3, bucket, "exports/req_retention01/") == 0


def test_planted_leftover_fails_the_check(cellcms: Settings, engine: Engine) -> None:
    s = services()
    url = s.settings.database_url.get_secret_value()
    rules = retention.rule_names(s.datamap)
    clean = checks.retention_checks(url, s.datamap, rules, TODAY)
    assert clean.success, clean.summary()

    with engine.begin() as connection:
        account = connection.execute(text("SELECT min(account_id) FROM access_logs")).scalar_one()
        connection.execute(
            text(
                "INSERT INTO access_logs (id, account_id, ip_address, accessed_at, method, path, "
                "status_code, referrer) "
                "VALUES (999999001, :a, '198.51.100.77', now() - interval '200 days', 'GET', '/', 200, "
                "'https://example.com/?email=planted@example.com')"
            ),
            {"a": account},
        )
    try:
        result = checks.retention_checks(url, s.datamap, rules, TODAY)
    finally:
        with engine.begin() as connection:
            connection.execute(text("DELETE FROM access_logs WHERE id = 999999001"))
    assert not result.success
    failed = {(f.asset, f.column, f.unexpected_count) for f in result.failures}
    assert ("access_log_network_data.leftover", "leftover", 1) in failed
    assert ("access_log_network_data.anonymised", "ip_address", 1) in failed
    assert ("access_log_network_data.anonymised", "referrer", 1) in failed
    assert "planted" not in str(result.summary()) and "198.51" not in str(result.summary())


# ------------------------------------------------------------------------------------------------ Data Docs
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")


def _get(url: str) -> tuple[str, str]:
    """GET over loopback (no proxy): (Content-Type, body)."""
    assert url.startswith("http://127.0.0.1:"), url
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=10) as response:
        return response.headers["Content-Type"], response.read().decode("utf-8")


def _docs_pages(run_page_url: str) -> tuple[str, dict[str, str]]:
    """The run page and every validation page it links, by suite name."""
    kind, page = _get(run_page_url)
    assert kind.startswith("text/html")
    links = re.findall(r'<a href="([^"]+)">([^<]+)</a>', page)
    assert links, page
    pages = {}
    for url, suite in links:
        kind, body = _get(html.unescape(url))
        assert kind.startswith("text/html")
        pages[suite] = body
    return page, pages


def _seeded_emails(engine: Engine) -> set[str]:
    with engine.connect() as connection:
        rows = connection.execute(
            text("SELECT email FROM accounts UNION SELECT billing_email FROM billing_profiles")
        ).scalars()
        return {str(r).lower() for r in rows if r}


def test_data_docs_published_for_the_run(
    cellcms: Settings, engine: Engine, read_mail: Callable[[], list[EmailMessage]]
) -> None:
    from prefect.artifacts import Artifact

    mail_before = len(read_mail())
    nightly_retention(RetentionRun(as_of=TODAY, max_share=1.0))
    (summary,) = [m for m in read_mail()[mail_before:] if "nightly retention run" in str(m["Subject"])]
    body = summary.get_content()
    (link,) = re.findall(r"Data Docs \(link valid 7 days\): (\S+)", body)
    artifact = Artifact.get("nightly-retention-verdict")
    assert artifact is not None and link in str(artifact.data)
    assert "/data-docs/" in link and "/run.html?" in link

    run_page, pages = _docs_pages(link)
    assert "all passed" in run_page
    suites = {f"retention.{asset}" for asset, _, _ in checks._retention_plans(services().datamap, _rules(), TODAY)}
    assert suites <= set(pages), suites - set(pages)
    access_logs = pages["retention.access_log_network_data.anonymised"]
    assert "Status: Succeeded" in _text(access_logs) and "access_logs" in access_logs  # the query names the table
    seeded = _seeded_emails(engine)
    assert seeded
    for html_page in [run_page, *pages.values()]:
        found = {e.lower() for e in _EMAIL.findall(_text(html_page))}
        assert not found & seeded
        assert not found, found  # no email address at all


def test_data_docs_show_a_failure_without_values(
    cellcms: Settings, engine: Engine, s3: Any, tmp_path: Path
) -> None:
    s = services()
    with engine.begin() as connection:
        account = connection.execute(text("SELECT min(account_id) FROM access_logs")).scalar_one()
        connection.execute(
            text(
                "INSERT INTO access_logs (id, account_id, ip_address, accessed_at, method, path, "
                "status_code, referrer) "
                "VALUES (999999002, :a, '198.51.100.78', now() - interval '200 days', 'GET', '/', 200, "
                "'https://example.com/?email=planted-docs@example.com')"
            ),
            {"a": account},
        )
    try:
        result = checks.retention_checks(
            s.settings.database_url.get_secret_value(), s.datamap, _rules(), TODAY, docs_dir=tmp_path
        )
    finally:
        with engine.begin() as connection:
            connection.execute(text("DELETE FROM access_logs WHERE id = 999999002"))
    assert not result.success
    failed = {p.suite for p in result.docs_pages if not p.success}
    assert failed == {"retention.access_log_network_data.leftover", "retention.access_log_network_data.anonymised"}
    assert all((tmp_path / p.path).is_file() for p in result.docs_pages)

    link = data_docs.publish(s3, cellcms.export_bucket, "test-docs-failure", tmp_path, result.docs_pages)
    run_page, pages = _docs_pages(link)
    assert "2 of" in run_page and "FAILED" in run_page
    page = _text(pages["retention.access_log_network_data.anonymised"])
    assert "Status: Failed" in page and "1 unexpected values found" in page
    head = s3.head_object(
        Bucket=cellcms.export_bucket, Key=f"data-docs/test-docs-failure/{result.docs_pages[0].path}"
    )
    assert head["ContentType"].startswith("text/html") and head["ServerSideEncryption"] == "AES256"
    for html_page in [run_page, *pages.values()]:
        assert "planted-docs" not in html_page and "198.51.100" not in html_page
        assert not set(_EMAIL.findall(_text(html_page))) & _seeded_emails(engine)


def _rules() -> list[str]:
    return retention.rule_names(services().datamap)


def _text(page: str) -> str:
    """A page's visible text (scripts and styles dropped, tags removed, entities decoded)."""
    page = re.sub(r"<(script|style)\b.*?</\1>", " ", page, flags=re.S)
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page)))


def _paused_retention_run(timeout: float = 120) -> Any:
    """The id of the nightly-retention run that is paused waiting for an operator."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=["nightly-retention"])),
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))
                ),
            )
            if runs:
                return runs[0].id
            time.sleep(1)
    raise AssertionError("no retention run paused for approval")


def test_a_rule_over_its_threshold_waits_for_an_operator(cellcms: Settings, engine: Engine) -> None:
    from prefect.flow_runs import resume_flow_run

    from privacy_ops.runner import start_flow

    old = datetime.now(UTC) - timedelta(days=200)
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO access_logs (id, account_id, ip_address, accessed_at, method, path, status_code, "
                "referrer) SELECT 999999100 + n, 30, '203.0.113.9', :old, 'GET', '/', 200, 'https://x.example/' "
                "FROM generate_series(1, 3) AS n"
            ),
            {"old": old},
        )
    untouched = "SELECT count(*) FROM access_logs WHERE id > 999999100 AND masklen(ip_address) = 32"
    params = RetentionRun(rules=["access_log_network_data"], as_of=TODAY, max_share=0.0001)

    rejected = start_flow(nightly_retention, params=params)
    resume_flow_run(_paused_retention_run(), run_input={"approve": False, "approved_by": "ops on duty"})
    [report] = rejected.wait(300)
    assert report["status"] == "rejected" and _scalar(engine, untouched) == 3  # nothing acted without approval

    approved = start_flow(nightly_retention, params=params)
    resume_flow_run(_paused_retention_run(), run_input={"approve": True, "approved_by": "ops on duty"})
    [report] = approved.wait(300)
    assert report["stores"]["postgres"] >= 3 and _scalar(engine, untouched) == 0

"""The right to data portability (GDPR art. 20) and the CCPA right to know, end to end against the real stack.

Each request is driven as an operator drives it (start, read the code from the SMTP sink, resume the paused run),
then every store it touched is looked at directly: the package in the exports bucket, the content bucket it read
from, the request, email and audit records in PostgreSQL, the SMTP sink. Each request is then resumed once more by
id: no email goes out twice and the audit chain still verifies. Fast unit tests of the views and the typed forms
need no stack.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import zipfile
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from flows.know_request import know_request
from flows.parameters import SubjectIntake
from flows.portability_request import portability_request
from privacy_ops.datamap import load_datamap
from privacy_ops.datamap.model import Category
from privacy_ops.lifecycle import audit
from privacy_ops.lifecycle.requests import Regulation, Request, Status
from privacy_ops.portability import (
    OBSERVED_CATEGORIES,
    collected_since,
    months_before,
    portable_tables,
    provided_view,
)
from privacy_ops.runner import final_status
from privacy_ops.settings import Settings
from privacy_ops.stores.postgres import OTHER_ACCOUNT, WITHHELD, TableExport
from tests.conftest import SEEDED_ACCOUNTS
from tests.test_flows import messages_for, run_to_completion

DATAMAP = load_datamap(Path(__file__).resolve().parent.parent / "datamap" / "cellcms.yaml")
PORTABLE = portable_tables(DATAMAP)
OBSERVED_TABLES = {n for n, t in DATAMAP.postgres.tables.items() if t.category in OBSERVED_CATEGORIES}


def _package(s3: Any, request: Request, outcome_key: str) -> zipfile.ZipFile:
    location = request.outcome[outcome_key]
    return zipfile.ZipFile(
        io.BytesIO(s3.get_object(Bucket=location["bucket"], Key=location["key"])["Body"].read())
    )


def _ids(engine: Engine, sql: str, **params: Any) -> list[int]:
    with engine.connect() as connection:
        return sorted(connection.execute(text(sql), params).scalars())


def _other_emails(engine: Engine, account_id: int) -> list[str]:
    with engine.connect() as connection:
        return list(
            connection.execute(
                text("SELECT lower(email) FROM accounts WHERE id <> :id AND id <= :n"),
                {"id": account_id, "n": SEEDED_ACCOUNTS},
            ).scalars()
        )


def _rerun_sends_nothing_new(
    flow_fn: Any, request_id: str, built: str, engine: Engine, s3: Any, read_mail: Callable[[], list[EmailMessage]]
) -> None:
    """Resume a finished request by id: it completes again (the package rebuilt in place), no email is sent twice,
    the audit chain verifies."""
    before = messages_for(read_mail, request_id)
    assert flow_fn(resume_request_id=request_id) == Status.completed.value
    after = messages_for(read_mail, request_id)
    assert after == before and len(after) == 3 and len(set(after)) == 3  # acknowledgement, code, completion
    with engine.connect() as connection:
        chain = audit.verify(connection)
        steps = [(e.step, e.outcome) for e in audit.entries_for_request(connection, request_id)]
        sent = connection.execute(
            text("SELECT kind, status FROM privacy_ops.notifications WHERE request_id = :r ORDER BY kind"),
            {"r": request_id},
        ).all()
    assert chain.ok, chain.problems
    assert steps.count(("complete", "completed")) == 1
    assert steps.count(("act", built)) == 2 and steps.count(("check", "passed")) == 2  # both runs, one history
    assert steps.count(("notify", "completion")) == 1
    request = final_status(engine, request_id)
    assert request.status == Status.completed
    location = next(v for k, v in request.outcome.items() if k.endswith("_package"))
    listing = s3.list_objects_v2(Bucket=location["bucket"], Prefix=f"exports/{request_id}/")["Contents"]
    assert [o["Key"] for o in listing] == [location["key"]]  # replaced, not added
    assert [tuple(row) for row in sent] == [
        ("acknowledgement", "sent"),
        ("completion", "sent"),
        ("verification_code", "sent"),
    ]


# ------------------------------------------------------------------------------------------------- portability


@pytest.fixture(scope="module")
def host(cellcms: Settings, engine: Engine) -> int:
    """An account whose project holds a document a collaborator wrote, naming the collaborator's email."""
    hosts = _ids(
        engine,
        "SELECT DISTINCT p.owner_account_id FROM documents d JOIN projects p ON p.id = d.project_id "
        "JOIN accounts a ON a.id = d.author_account_id "
        "WHERE d.author_account_id <> p.owner_account_id AND strpos(d.body, a.email) > 0",
    )
    assert hosts, "the sandbox plants collaborators' documents in other accounts' projects"
    return hosts[0]


def test_portability_package_holds_what_the_person_provided_and_nothing_else(
    cellcms: Settings, host: int, engine: Engine, s3: Any, read_mail: Callable[[], list[EmailMessage]]
) -> None:
    mine = {
        "projects": _ids(engine, "SELECT id FROM projects WHERE owner_account_id = :id", id=host),
        "documents": _ids(
            engine,
            "SELECT d.id FROM documents d JOIN projects p ON p.id = d.project_id "
            "WHERE d.author_account_id = :id OR (p.owner_account_id = :id AND d.author_account_id IS NULL)",
            id=host,
        ),
        "content_schemas": _ids(
            engine,
            "SELECT s.id FROM content_schemas s JOIN projects p ON p.id = s.project_id "
            "WHERE p.owner_account_id = :id",
            id=host,
        ),
        "assets": _ids(
            engine,
            "SELECT s.id FROM assets s JOIN projects p ON p.id = s.project_id WHERE p.owner_account_id = :id",
            id=host,
        ),
    }
    by_collaborators = _ids(
        engine,
        "SELECT d.id FROM documents d JOIN projects p ON p.id = d.project_id "
        "WHERE p.owner_account_id = :id AND d.author_account_id <> :id",
        id=host,
    )
    with engine.connect() as connection:
        email = connection.execute(text("SELECT email FROM accounts WHERE id = :id"), {"id": host}).scalar_one()
        s3_keys: dict[int, str] = dict(
            connection.execute(
                text(
                    "SELECT s.id, s.s3_key FROM assets s JOIN projects p ON p.id = s.project_id "
                    "WHERE p.owner_account_id = :id"
                ),
                {"id": host},
            ).all()
        )
    assert all(mine.values()) and by_collaborators
    content_versions = s3.list_object_versions(Bucket=cellcms.content_bucket, Prefix=f"accounts/{host}/")

    request_id = run_to_completion(
        portability_request, "portability", engine, read_mail, SubjectIntake(email=email)
    )

    request = final_status(engine, request_id)
    assert request.status == Status.completed
    assert request.outcome["checks"]["success"] is True, request.outcome["checks"]
    assert request.outcome["non_discrimination"]["verdict"] == "unchanged"
    archive = _package(s3, request, "portability_package")
    assert archive.testzip() is None
    names = set(archive.namelist())

    # The manifest: format and version, every portable table with its rows and digests, every file.
    manifest = json.loads(archive.read("manifest.json"))
    assert (manifest["format"], manifest["format_version"]) == ("cellcms-portability", 1)
    assert [t["table"] for t in manifest["tables"]] == PORTABLE
    for table in manifest["tables"]:
        rows = json.loads(archive.read(f"{table['table']}.json"))
        with archive.open(f"{table['table']}.csv") as stream:
            parsed = list(csv.reader(io.TextIOWrapper(stream, encoding="utf-8", newline="")))
        assert parsed[0] == table["columns"] == (list(rows[0]) if rows else table["columns"])
        assert len(rows) == len(parsed) - 1 == table["rows"]
        for entry in table["files"]:
            assert hashlib.sha256(archive.read(entry["path"])).hexdigest() == entry["sha256"]
    assert manifest["tables"][PORTABLE.index("documents")]["references"]["project_id"] == "projects.id"

    # Only what the person provided: their content (not the collaborator's document in their project) and profile.
    tables = {name: json.loads(archive.read(f"{name}.json")) for name in PORTABLE}
    for name, expected in mine.items():
        assert sorted(r["id"] for r in tables[name]) == expected, name
    assert not {r["id"] for r in tables["documents"]} & set(by_collaborators)
    assert [a["email"] for a in tables["accounts"]] == [email]
    assert "password_hash" not in tables["accounts"][0] and "last_active_at" not in tables["accounts"][0]
    assert tables["asset_versions"] and all("uploader_ip" not in v for v in tables["asset_versions"])
    assert all(m["account_id"] == str(host) for m in tables["project_members"])
    # No observed data at all: only the portable tables, their files and the manifest.
    table_files = {n for n in names if not n.startswith("files/")} - {"manifest.json"}
    assert table_files == {f"{t}.{ext}" for t in PORTABLE for ext in ("json", "csv")}
    assert not any(n.startswith(f"{t}.") for n in names for t in OBSERVED_TABLES)

    # The asset files byte for byte: each asset's current version, as S3 holds it.
    files = {f["s3_key"]: f for f in manifest["files"]}
    assert sorted(files) == sorted(s3_keys.values())
    for key in s3_keys.values():
        original = s3.get_object(Bucket=cellcms.content_bucket, Key=key)["Body"].read()
        assert archive.read(f"files/{key}") == original
        assert files[key]["sha256"] == hashlib.sha256(original).hexdigest()

    # Nobody else's email anywhere, though a collaborator's document in the project names theirs.
    everything = "\n".join(archive.read(n).decode("utf-8", "replace") for n in names).lower()
    assert email.lower() in everything
    for other in _other_emails(engine, host):
        assert other not in everything, "another person's email is in the package"

    # The stores: one encrypted package in the exports bucket, the content bucket only read, the emails.
    listing = s3.list_objects_v2(Bucket=cellcms.export_bucket, Prefix=f"exports/{request_id}/")["Contents"]
    assert [o["Key"] for o in listing] == [f"exports/{request_id}/portability-package-{request_id}.zip"]
    head = s3.head_object(Bucket=cellcms.export_bucket, Key=listing[0]["Key"])
    assert head["ServerSideEncryption"] == "AES256"
    after = s3.list_object_versions(Bucket=cellcms.content_bucket, Prefix=f"accounts/{host}/")
    assert [v["VersionId"] for v in after["Versions"]] == [v["VersionId"] for v in content_versions["Versions"]]
    completion = next(
        m for m in read_mail() if request_id in str(m["Subject"]) and "complete" in str(m["Subject"])
    )
    body = completion.get_body(preferencelist=("plain",))
    assert body is not None and "X-Amz-Signature" in body.get_content()
    assert len(messages_for(read_mail, request_id)) == 3

    _rerun_sends_nothing_new(portability_request, request_id, "portability_package_built", engine, s3, read_mail)


# ------------------------------------------------------------------------------------------------- right to know


def test_know_package_lists_categories_and_only_the_last_12_months(
    cellcms: Settings, engine: Engine, s3: Any, read_mail: Callable[[], list[EmailMessage]]
) -> None:
    subject = 2  # a hard-case account: data in every category
    now = datetime.now(UTC)
    old_view, recent_view = _ids(engine, "SELECT id FROM page_views WHERE account_id = :id LIMIT 2", id=subject)
    with engine.begin() as connection:
        for view_id, viewed_at in ((old_view, months_before(now, 13)), (recent_view, now - timedelta(days=1))):
            connection.execute(
                text("UPDATE page_views SET viewed_at = :at WHERE id = :id"), {"at": viewed_at, "id": view_id}
            )
        email = connection.execute(text("SELECT email FROM accounts WHERE id = :id"), {"id": subject}).scalar_one()

    request_id = run_to_completion(
        know_request, "know", engine, read_mail, SubjectIntake(account_id=subject, regulation=Regulation.CCPA)
    )

    request = final_status(engine, request_id)
    assert request.status == Status.completed
    assert request.outcome["checks"]["success"] is True, request.outcome["checks"]
    archive = _package(s3, request, "know_package")
    names = set(archive.namelist())
    since = months_before(request.received_at)

    # The categories, with the policy's sources and purposes from the data map.
    disclosure = json.loads(archive.read("categories.json"))
    listed = {c["category"]: c for c in disclosure["categories"]}
    held = {
        spec.category.value
        for table_name, spec in DATAMAP.postgres.tables.items()
        if f"{spec.category.value}/{table_name}.json" in names
        and json.loads(archive.read(f"{spec.category.value}/{table_name}.json"))
    }
    assert held <= set(listed) and {"account", "usage", "billing"} <= set(listed)
    for name, category in listed.items():
        mapped = DATAMAP.disclosures[Category(name)]
        assert (category["description"], category["sources"], category["purposes"]) == (
            mapped.description,
            mapped.sources,
            mapped.purposes,
        )
        assert category["records"] and all(n > 0 for n in category["records"].values())
    assert listed["usage"]["records"]["page_views"] >= 1
    assert listed["billing"]["shared_with"] == ["Stripe (payment processing)"]
    readable = archive.read("categories.md").decode()
    assert "## Usage data" in readable and "Sources:" in readable and "Purposes:" in readable

    # The specific pieces: of the 12 months before the request; tables without a collection date whole.
    views = json.loads(archive.read("usage/page_views.json"))
    assert recent_view in [v["id"] for v in views] and old_view not in [v["id"] for v in views]
    for table_name, spec in DATAMAP.postgres.tables.items():
        path = f"{spec.category.value}/{table_name}.json"
        if spec.collected_at is None or path not in names:
            continue
        for row in json.loads(archive.read(path)):
            assert collected_since(row[spec.collected_at], since), f"{table_name} row older than 12 months"
    accounts = json.loads(archive.read("account/accounts.json"))
    assert [a["email"] for a in accounts] == [email]  # no collected_at: whole
    in_window = _ids(
        engine, "SELECT id FROM page_views WHERE account_id = :id AND viewed_at >= :since", id=subject, since=since
    )
    assert sorted(v["id"] for v in views) == in_window
    assert "summary.html" in names

    completion = next(
        m for m in read_mail() if request_id in str(m["Subject"]) and "complete" in str(m["Subject"])
    )
    body = completion.get_body(preferencelist=("plain",))
    assert body is not None and "X-Amz-Signature" in body.get_content()
    assert "Categories of personal information" in body.get_content()

    _rerun_sends_nothing_new(know_request, request_id, "know_package_built", engine, s3, read_mail)


# ------------------------------------------------------------------------------------------------- no stack


def test_provided_view_drops_secrets_observed_columns_and_others_rows() -> None:
    accounts = TableExport(
        "accounts",
        "account",
        ["id", "email", "password_hash", "last_active_at"],
        iter([(7, "a@example.org", WITHHELD, datetime(2026, 1, 1, tzinfo=UTC))]),
    )
    view = provided_view(DATAMAP, accounts)
    assert view.columns == ["id", "email"] and list(view.rows) == [(7, "a@example.org")]
    documents = TableExport(
        "documents", "content", ["id", "author_account_id"], iter([(1, "7"), (2, OTHER_ACCOUNT), (3, None)])
    )
    assert [row[0] for row in provided_view(DATAMAP, documents).rows] == [1, 3]


def test_the_12_month_window() -> None:
    received = datetime(2026, 3, 31, 12, tzinfo=UTC)
    since = months_before(received)
    assert since == datetime(2025, 3, 31, 12, tzinfo=UTC)
    assert months_before(datetime(2024, 2, 29, tzinfo=UTC)) == datetime(2023, 2, 28, tzinfo=UTC)
    assert collected_since(date(2025, 3, 31), since) and not collected_since(date(2025, 3, 30), since)
    assert collected_since(None, since)  # unknown: disclosed rather than hidden
    assert not collected_since("2025-03-31T11:59:59+00:00", since)


@pytest.mark.parametrize("flow_fn", [portability_request, know_request])
def test_the_forms_reject_bad_input(flow_fn: Any) -> None:
    from prefect.exceptions import ParameterTypeError

    schema = flow_fn.parameters.model_dump()
    intake = schema["definitions"]["SubjectIntake"]["properties"]
    assert intake["email"]["anyOf"][0]["pattern"] and set(intake) == {
        "email",
        "account_id",
        "regulation",
        "requested_by",
    }
    with pytest.raises(ParameterTypeError):
        flow_fn.validate_parameters({"intake": {"email": "not an email"}})
    with pytest.raises(ParameterTypeError):
        flow_fn.validate_parameters({"intake": {"email": "a@example.org", "account_id": 3}})


def test_the_commands_validate_the_intake_before_any_flow_runs() -> None:
    from typer.testing import CliRunner

    from privacy_ops.cli import app

    for command in ("portability", "know"):
        result = CliRunner().invoke(app, ["request", command, "--email", "a@example.org", "--account-id", "3"])
        assert result.exit_code == 2 and "exactly one of email or account_id" in result.output
        result = CliRunner().invoke(app, ["request", command, "--email", "nope"])
        assert result.exit_code == 2


def test_the_package_suite_fails_on_a_leak_an_old_row_or_an_undisclosed_category() -> None:
    import pandas as pd

    from privacy_ops.checks import rights_package_checks

    def run(**frames: pd.DataFrame) -> Any:
        return rights_package_checks(
            "know_package",
            pd.DataFrame([{"table": "accounts", "category": "account", "account_id": 7, "rows": 1}]),
            {7},
            subject_rows=frames.get("subject", pd.DataFrame([{"account_id": 7, "email": "ann@example.org"}])),
            emails_on_file={"Ann@Example.org"},
            email_owners=frames.get(
                "emails", pd.DataFrame([{"table": "documents", "column": "body", "owner": "subject"}])
            ),
            window=frames.get("window", pd.DataFrame([{"table": "page_views", "rows_before_window": 0}])),
            categories=frames.get(
                "categories", pd.DataFrame([{"category": "usage", "listed": True, "described": True}])
            ),
        )

    assert run().success
    leaks = {
        "subject": pd.DataFrame([{"account_id": 7, "email": "bob@example.org"}]),
        "emails": pd.DataFrame([{"table": "documents", "column": "body", "owner": "other_account"}]),
        "window": pd.DataFrame([{"table": "page_views", "rows_before_window": 1}]),
        "categories": pd.DataFrame([{"category": "usage", "listed": True, "described": False}]),
    }
    for asset, frame in leaks.items():
        result = run(**{asset: frame})
        assert not result.success and {f.asset for f in result.failures} == {asset}, asset
        assert "bob@example.org" not in json.dumps(result.summary())

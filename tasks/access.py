"""The access right's own step: gather every mapped record of the subject into one package, streamed to S3.

`write_subject_data` (every mapped table, mentions, S3 files, Stripe, request history) and `publish_package`
(presigned link + audit) are shared with the right to know (tasks/portability.py), which writes the same content
restricted to the last 12 months.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from privacy_ops import export
from privacy_ops.checks import SubjectIdentifiers
from privacy_ops.lifecycle import audit, requests
from privacy_ops.portability import window_view
from privacy_ops.services import Services
from privacy_ops.stores import postgres, stripe_store
from privacy_ops.stores import s3 as s3_store
from tasks.lifecycle import stripe_customer_ids
from tasks.step import step

LINK_DAYS = 7

TableView = Callable[[postgres.TableExport], postgres.TableExport]


@dataclass(frozen=True)
class AccessPackage:
    """Where a package (access, portability, right to know) is and what it holds (counts only)."""

    bucket: str
    key: str
    url: str
    expires_at: datetime
    size_bytes: int
    rows_per_table: dict[str, int]
    files: int
    mentions: dict[str, int]
    stripe_customers: int

    def summary(self) -> dict[str, object]:
        data = asdict(self)
        data.pop("url")  # a bearer link to the person's data: emailed to them, never audited
        data["expires_at"] = self.expires_at.isoformat()
        return data


@dataclass
class SubjectData:
    """What `write_subject_data` put into a package (counts, and the Stripe summaries for the HTML overview)."""

    rows: dict[str, int] = field(default_factory=dict)
    files: dict[str, int] = field(default_factory=dict)  # S3 files per category
    mentions: list[postgres.Mention] = field(default_factory=list)
    stripe_summaries: list[dict[str, Any]] = field(default_factory=list)


def write_subject_data(
    services: Services,
    package: export.PackageWriter,
    account_ids: list[int],
    *,
    collected_since: datetime | None = None,
    view: TableView | None = None,
) -> SubjectData:
    """Every mapped table, where others mention the person, the S3 files, the Stripe customer and the request
    history, as the access package lays them out.

    `collected_since` keeps only rows whose `collected_at` is on or after it (tables without one whole) and files
    last modified since; `view` sees each table's rows on their way into the package (e.g. to count them).
    """
    datamap, s3 = services.datamap, services.s3
    written = SubjectData()
    with services.engine.connect() as connection:
        for table_name in datamap.postgres.tables:
            table = postgres.export_table(connection, datamap, table_name, account_ids)
            if collected_since is not None:
                table = window_view(datamap, table, collected_since)
            if view is not None:
                table = view(table)
            count = package.add_table(table.category, table.table, table.columns, table.rows)
            if count:
                written.rows[table_name] = count
        subject = SubjectIdentifiers.from_kinds(postgres.collect_identifiers(connection, datamap, account_ids))
        written.mentions = postgres.find_mentions(connection, datamap, subject, account_ids)
        package.add_json(
            "mentions/where-you-are-mentioned.json",
            [{"table": m.table, "column": m.column, "rows": m.rows} for m in written.mentions],
            category="mentions",
        )
        for location in datamap.s3.values():
            category = location.category.value
            bucket = getattr(services.settings, location.bucket_setting)
            for account_id in account_ids:
                for version in s3_store.list_versions(s3, bucket, location.prefix.format(account_id=account_id)):
                    if not version.is_latest or version.is_delete_marker:
                        continue
                    if collected_since is not None and version.last_modified < collected_since:
                        continue
                    package.add_s3_object(
                        f"{category}/files/{version.key}", s3, bucket, version.key, category=category
                    )
                    written.files[category] = written.files.get(category, 0) + 1
        for customer_id in stripe_customer_ids(connection, services, account_ids):
            summary = stripe_store.customer_summary(services.stripe, customer_id)
            if summary is not None:
                written.stripe_summaries.append(summary)
                package.add_json(f"billing/stripe-{customer_id}.json", summary, category="billing")
        package.add_json(
            "requests/privacy-requests.json",
            requests.history_for_accounts(connection, account_ids),
            category="requests",
        )
    return written


def add_access_summary(
    package: export.PackageWriter, written: SubjectData, notes: list[str] | None = None
) -> None:
    """The readable overview (summary.html) with the access package's standing notes."""
    package.add_summary_html(
        billing=written.stripe_summaries[0] if written.stripe_summaries else None,
        notes=[
            "Passwords are stored only as one-way hashes and are not included.",
            "Where other people's records mention you, the package lists where, not their records.",
            *(notes or []),
        ],
    )


def publish_package(
    services: Services,
    request_id: str,
    result: export.PackageResult,
    *,
    outcome: str,
    rows: dict[str, int],
    files: int,
    mentions: list[postgres.Mention] | None = None,
    stripe_customers: int = 0,
) -> AccessPackage:
    """Presign a finished package's link (valid LINK_DAYS) and audit it as `outcome` (counts, never the link)."""
    expires_at = services.now() + timedelta(days=LINK_DAYS)
    url = export.presigned_url(services.s3, result.bucket, result.key, expires_days=LINK_DAYS)
    built = AccessPackage(
        bucket=result.bucket,
        key=result.key,
        url=url,
        expires_at=expires_at,
        size_bytes=result.size_bytes,
        rows_per_table=rows,
        files=files,
        mentions={f"{m.table}.{m.column}": m.rows for m in mentions or []},
        stripe_customers=stripe_customers,
    )
    with services.engine.begin() as connection:
        request = requests.get_request(connection, request_id)
        audit.record(
            connection,
            step="act",
            outcome=outcome,
            request_id=request_id,
            subject_hash=request.subject_hash,
            details=built.summary(),
        )
    return built


@step()
def build_access_package(services: Services, request_id: str, account_ids: list[int]) -> AccessPackage:
    """Every mapped table, the S3 files, the Stripe customer and the request history, as JSON + CSV + HTML."""
    with export.PackageWriter.for_settings(services.s3, services.settings, request_id) as package:
        written = write_subject_data(services, package, account_ids)
        add_access_summary(package, written)
        result = package.finish()
    return publish_package(
        services,
        request_id,
        result,
        outcome="access_package_built",
        rows=written.rows,
        files=sum(written.files.values()),
        mentions=written.mentions,
        stripe_customers=len(written.stripe_summaries),
    )

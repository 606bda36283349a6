"""The access right's own step: gather every mapped record of the subject into one package, streamed to S3."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timedelta

from privacy_ops import export
from privacy_ops.checks import SubjectIdentifiers
from privacy_ops.lifecycle import audit, requests
from privacy_ops.services import Services
from privacy_ops.stores import postgres, stripe_store
from privacy_ops.stores import s3 as s3_store
from tasks.lifecycle import s3_prefixes, stripe_customer_ids
from tasks.step import step

LINK_DAYS = 7


@dataclass(frozen=True)
class AccessPackage:
    """Where the package is and what it holds (counts only)."""

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


@step()
def build_access_package(services: Services, request_id: str, account_ids: list[int]) -> AccessPackage:
    """Every mapped table, the S3 files, the Stripe customer and the request history, as JSON + CSV + HTML."""
    datamap, s3 = services.datamap, services.s3
    rows: dict[str, int] = {}
    files = 0
    stripe_summaries = []
    with (
        services.engine.connect() as connection,
        export.PackageWriter.for_settings(s3, services.settings, request_id) as package,
    ):
        for table_name in datamap.postgres.tables:
            table = postgres.export_table(connection, datamap, table_name, account_ids)
            count = package.add_table(table.category, table.table, table.columns, table.rows)
            if count:
                rows[table_name] = count
        subject = SubjectIdentifiers.from_kinds(postgres.collect_identifiers(connection, datamap, account_ids))
        mentions = postgres.find_mentions(connection, datamap, subject, account_ids)
        package.add_json(
            "mentions/where-you-are-mentioned.json",
            [{"table": m.table, "column": m.column, "rows": m.rows} for m in mentions],
            category="mentions",
        )
        for bucket, prefix in s3_prefixes(services, account_ids):
            for version in s3_store.list_versions(s3, bucket, prefix):
                if version.is_latest and not version.is_delete_marker:
                    package.add_s3_object(
                        f"content/files/{version.key}", s3, bucket, version.key, category="content"
                    )
                    files += 1
        for customer_id in stripe_customer_ids(connection, services, account_ids):
            summary = stripe_store.customer_summary(services.stripe, customer_id)
            if summary is not None:
                stripe_summaries.append(summary)
                package.add_json(f"billing/stripe-{customer_id}.json", summary, category="billing")
        package.add_json(
            "requests/privacy-requests.json",
            requests.history_for_accounts(connection, account_ids),
            category="requests",
        )
        package.add_summary_html(
            billing=stripe_summaries[0] if stripe_summaries else None,
            notes=[
                "Passwords are stored only as one-way hashes and are not included.",
                "Where other people's records mention you, the package lists where, not their records.",
            ],
        )
        result = package.finish()
    expires_at = services.now() + timedelta(days=LINK_DAYS)
    url = export.presigned_url(s3, result.bucket, result.key, expires_days=LINK_DAYS)
    built = AccessPackage(
        bucket=result.bucket,
        key=result.key,
        url=url,
        expires_at=expires_at,
        size_bytes=result.size_bytes,
        rows_per_table=rows,
        files=files,
        mentions={f"{m.table}.{m.column}": m.rows for m in mentions},
        stripe_customers=len(stripe_summaries),
    )
    with services.engine.begin() as connection:
        request = requests.get_request(connection, request_id)
        audit.record(
            connection,
            step="act",
            outcome="access_package_built",
            request_id=request_id,
            subject_hash=request.subject_hash,
            details=built.summary(),
        )
    return built

"""Great Expectations steps: proof that an erasure left nothing and that an access package holds only the subject.

A failed check fails the step (and so the flow run): the request is never reported complete. The audit log and the
request outcome get the verdict with names and counts only, never the values that were found.
"""

from __future__ import annotations

import json
import tempfile
import zipfile
from typing import Any

import pandas as pd

from privacy_ops import checks
from privacy_ops.lifecycle import audit, requests
from privacy_ops.services import Services
from privacy_ops.stores import s3 as s3_store
from privacy_ops.stores import stripe_store
from tasks.access import AccessPackage
from tasks.erasure import SubjectSnapshot
from tasks.lifecycle import Located
from tasks.step import step


class ChecksFailed(Exception):
    """Great Expectations found something it should not have; the message names assets and counts only."""


@step(retries=0)
def check_erasure(services: Services, request_id: str, snapshot: SubjectSnapshot) -> dict[str, Any]:
    """Run the data-map suite over PostgreSQL, what is left in S3 and in Stripe; fail loudly on any leftover."""
    versions = [
        {"key": v.key, "version_id": v.version_id, "is_delete_marker": v.is_delete_marker}
        for bucket, prefix in snapshot.s3_locations
        for v in s3_store.list_versions(services.s3, bucket, prefix)
    ]
    s3_frame = pd.DataFrame(versions, columns=["key", "version_id", "is_delete_marker"])
    subject = snapshot.subject
    stripe_frame = stripe_store.customers_frame(
        services.stripe, customer_ids=snapshot.stripe_customer_ids, emails=sorted(subject.emails)
    )
    result = checks.erasure_checks(
        services.settings.database_url.get_secret_value(), services.datamap, subject, s3_frame, stripe_frame
    )
    return record_verdict(services, request_id, "erasure", result)


@step(retries=0)
def check_access_package(
    services: Services, request_id: str, package: AccessPackage, located: Located
) -> dict[str, Any]:
    """Read the package back from S3: its rows belong to the subject's accounts only, and every table holds as many
    rows as locate counted."""
    manifest = _manifest_of(services, package)
    result = checks.access_package_checks(manifest, set(located.account_ids))
    missing = [
        checks.Failure(
            "package", table, "rows_match_locate", abs(package.rows_per_table.get(table, 0) - rows), "rows"
        )
        for table, rows in located.postgres.items()
        if package.rows_per_table.get(table, 0) != rows
    ]
    combined = checks.CheckResult(
        result.suite, result.success and not missing, result.expectations + 1, (*result.failures, *missing)
    )
    return record_verdict(services, request_id, "access_package", combined)


def _manifest_of(services: Services, package: AccessPackage) -> pd.DataFrame:
    """(table, category, account_id, rows) per table and owning account, read from the package itself. Tables whose
    rows reach the account only through another table carry no account column: their account_id is null."""
    datamap = services.datamap
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryFile() as spool:
        services.s3.download_fileobj(package.bucket, package.key, spool)
        spool.seek(0)
        with zipfile.ZipFile(spool) as archive:
            for table_name, spec in datamap.postgres.tables.items():
                path = f"{spec.category.value}/{table_name}.json"
                if path not in archive.namelist():
                    continue
                direct = [r.column for r in spec.reaches if r.through is None]
                owner = direct[0] if len(direct) == len(spec.reaches) else None
                counts: dict[Any, int] = {}
                for row in json.loads(archive.read(path)):
                    key = _account_id(row.get(owner)) if owner else None
                    counts[key] = counts.get(key, 0) + 1
                rows += [
                    {"table": table_name, "category": spec.category.value, "account_id": account_id, "rows": n}
                    for account_id, n in counts.items()
                ]
    return pd.DataFrame(rows, columns=["table", "category", "account_id", "rows"])


def _account_id(value: Any) -> int:
    """An account id as exported; another account's id is exported masked, which counts as -1 (never ours)."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1


def record_verdict(services: Services, request_id: str, suite: str, result: checks.CheckResult) -> dict[str, Any]:
    summary = result.summary()
    with services.engine.begin() as connection:
        request = requests.get_request(connection, request_id)
        audit.record(
            connection,
            step="check",
            outcome="passed" if result.success else "failed",
            request_id=request_id,
            subject_hash=request.subject_hash,
            details={"suite": suite, **summary},
        )
        requests.merge_outcome(connection, request_id, {"checks": summary})
    if not result.success:
        failed = ", ".join(f"{f.asset}.{f.column or '*'} ({f.unexpected_count})" for f in result.failures)
        raise ChecksFailed(f"request {request_id}: {suite} checks failed: {failed}")
    return summary

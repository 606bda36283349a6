"""Great Expectations steps: proof that an erasure left nothing and that an access package holds only the subject.

A failed check fails the step (and so the flow run): the request is never reported complete. The audit log and the
request outcome get the verdict with names and counts only, never the values that were found.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from privacy_ops import checks
from privacy_ops.lifecycle import audit, requests
from privacy_ops.services import Services
from privacy_ops.stores import s3 as s3_store
from privacy_ops.stores import stripe_store
from tasks.access import AccessPackage
from tasks.erasure import SubjectSnapshot
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
    subject = checks.SubjectIdentifiers.from_kinds(
        snapshot.identifiers,
        account_ids=snapshot.account_ids,
        s3_prefixes=[prefix for _, prefix in snapshot.s3_locations],
        stripe_ids=snapshot.stripe_customer_ids,
    )
    stripe_frame = stripe_store.customers_frame(
        services.stripe, customer_ids=snapshot.stripe_customer_ids, emails=sorted(subject.emails)
    )
    result = checks.erasure_checks(
        services.settings.database_url.get_secret_value(), services.datamap, subject, s3_frame, stripe_frame
    )
    return _record_verdict(services, request_id, "erasure", result)


@step(retries=0)
def check_access_package(
    services: Services, request_id: str, package: AccessPackage, account_ids: list[int]
) -> dict[str, Any]:
    """The package holds rows of the subject's accounts only, as many as locate counted."""
    result = checks.access_package_checks(services.s3, package.bucket, package.key, set(account_ids))
    return _record_verdict(services, request_id, "access_package", result)


def _record_verdict(services: Services, request_id: str, suite: str, result: checks.CheckResult) -> dict[str, Any]:
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

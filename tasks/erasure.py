"""The erasure right's own steps: snapshot the identifiers, erase each store, prove nothing is left.

Each store's step is idempotent: PostgreSQL erases in one transaction together with its audit entry (a rerun finds
the entry and returns its counts), S3 purges converge by re-listing, Stripe calls carry idempotency keys and treat
a missing customer as done.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, insert, select

from privacy_ops.checks import SubjectIdentifiers
from privacy_ops.lifecycle import audit, requests
from privacy_ops.lifecycle.schema import audit_log, subject_snapshots
from privacy_ops.pii import Pii, pseudonym
from privacy_ops.results import fernet
from privacy_ops.services import Services
from privacy_ops.stores import postgres, stripe_store
from privacy_ops.stores import s3 as s3_store
from tasks.lifecycle import s3_prefixes, stripe_customer_ids
from tasks.step import step


@dataclass(frozen=True)
class SubjectSnapshot:
    """The subject's identifiers, taken before anything is erased: what erasure redacts, what checks hunt for, and
    where the completion email goes. Personal data: stored only encrypted (privacy_ops.subject_snapshots and task
    results), never in logs, audit entries or artifacts; deleted when the request ends."""

    account_ids: list[int]
    contact: Pii
    subject: SubjectIdentifiers
    stripe_customer_ids: list[str]
    s3_locations: list[tuple[str, str]]


@step()
def snapshot_subject(services: Services, request_id: str, account_ids: list[int]) -> SubjectSnapshot:
    """Collect every identifier of the accounts before erasure, or reload the one a crashed run stored."""
    with services.engine.begin() as connection:
        stored = connection.execute(
            select(subject_snapshots.c.payload).where(subject_snapshots.c.request_id == request_id)
        ).scalar_one_or_none()
        if stored is not None:
            snapshot: SubjectSnapshot = pickle.loads(fernet().decrypt(stored))
            return snapshot
        email = postgres.subject_email(connection, services.datamap, account_ids[0])
        locations = s3_prefixes(services, account_ids)
        snapshot = SubjectSnapshot(
            account_ids=account_ids,
            contact=Pii(email or ""),
            subject=SubjectIdentifiers.from_kinds(
                postgres.collect_identifiers(connection, services.datamap, account_ids),
                account_ids=account_ids,
                s3_prefixes=[prefix for _, prefix in locations],
                pseudonyms=[pseudonym(services.secret_key, account_id) for account_id in account_ids],
            ),
            stripe_customer_ids=stripe_customer_ids(connection, services, account_ids),
            s3_locations=locations,
        )
        connection.execute(
            insert(subject_snapshots).values(
                request_id=request_id, payload=fernet().encrypt(pickle.dumps(snapshot)), created_at=services.now()
            )
        )
    return snapshot


@step()
def forget_snapshot(services: Services, request_id: str) -> None:
    """The request is over: the erased person's identifiers are no longer needed anywhere."""
    with services.engine.begin() as connection:
        connection.execute(delete(subject_snapshots).where(subject_snapshots.c.request_id == request_id))


def _already_recorded(services: Services, key: str) -> dict[str, Any] | None:
    with services.engine.connect() as connection:
        return connection.execute(
            select(audit_log.c.details).where(audit_log.c.idempotency_key == key)
        ).scalar_one_or_none()


@step()
def erase_postgres(services: Services, request_id: str, snapshot: SubjectSnapshot) -> dict[str, Any]:
    """Apply the data map to every row in one transaction, audited in the same transaction."""
    key = f"{request_id}:act:postgres"
    done = _already_recorded(services, key)
    if done is not None:
        return done
    with services.engine.begin() as connection:
        request = requests.get_request(connection, request_id)
        erasure = postgres.erase_accounts(
            connection,
            services.datamap,
            account_ids=snapshot.account_ids,
            subject=snapshot.subject,
            secret_key=services.secret_key,
            request_id=request_id,
        )
        details = {"store": "postgres", "tables": erasure.summary()}
        audit.record(
            connection,
            step="act",
            outcome="postgres_erased",
            request_id=request_id,
            subject_hash=request.subject_hash,
            details=details,
            idempotency_key=key,
        )
    return details


@step()
def erase_s3(services: Services, request_id: str, snapshot: SubjectSnapshot) -> dict[str, Any]:
    """Remove every version and delete marker under the subject's prefixes (objects under legal hold stay)."""
    totals = {"versions_deleted": 0, "delete_markers_deleted": 0, "retained": 0}
    for bucket, prefix in snapshot.s3_locations:
        result = s3_store.purge_prefix(services.s3, bucket, prefix)
        totals["versions_deleted"] += result.versions_deleted
        totals["delete_markers_deleted"] += result.delete_markers_deleted
        totals["retained"] += result.retained
    details = {"store": "s3", **totals}
    _audit_store(services, request_id, "s3_erased", details)
    return details


@step()
def erase_stripe(services: Services, request_id: str, snapshot: SubjectSnapshot) -> dict[str, Any]:
    """Detach cards, blank and delete each Stripe customer; invoices stay in Stripe for tax law."""
    totals = {"customers_deleted": 0, "payment_methods_detached": 0, "already_gone": 0}
    for customer_id in snapshot.stripe_customer_ids:
        result = stripe_store.erase_customer(services.stripe, customer_id, request_id)
        totals["customers_deleted"] += int(result.customer_deleted)
        totals["payment_methods_detached"] += result.payment_methods_detached
        totals["already_gone"] += int(result.already_gone)
    details = {"store": "stripe", **totals}
    _audit_store(services, request_id, "stripe_erased", details)
    return details


def _audit_store(services: Services, request_id: str, outcome: str, details: dict[str, Any]) -> None:
    with services.engine.begin() as connection:
        request = requests.get_request(connection, request_id)
        audit.record(
            connection,
            step="act",
            outcome=outcome,
            request_id=request_id,
            subject_hash=request.subject_hash,
            details=details,
            idempotency_key=f"{request_id}:act:{outcome}",
        )


def erasure_summary(postgres: dict[str, Any], s3: dict[str, Any], stripe: dict[str, Any]) -> list[dict[str, Any]]:
    """What the completion email tells the person was done, per store, including what was kept and why."""
    tables = postgres["tables"]
    deleted = sum(t["deleted"] for t in tables.values())
    anonymised = sum(t["anonymised"] + t["mentions_redacted"] for t in tables.values())
    retained = sum(t["retained"] for t in tables.values())
    summary: list[dict[str, Any]] = [
        {"store": "CellCMS database", "action": "deleted", "count": deleted},
        {
            "store": "CellCMS database",
            "action": "anonymised",
            "count": anonymised,
            "note": "content you wrote in other people's projects stays, no longer linked to you",
        },
        {"store": "Files", "action": "deleted (every version)", "count": s3["versions_deleted"]},
        {"store": "Billing (Stripe)", "action": "customer deleted", "count": stripe["customers_deleted"]},
    ]
    if retained:
        summary.append(
            {
                "store": "Invoices",
                "action": "kept",
                "count": retained,
                "note": "tax law requires invoices for up to 7 years; they no longer carry your name or email",
            }
        )
    return summary

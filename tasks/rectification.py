"""The rectification right's own steps: review the corrections, plan them, confirm a new email address, correct
PostgreSQL and Stripe.

What the request asked for (new values) and what it replaces (old values) is kept encrypted in
privacy_ops.subject_snapshots from intake until the request ends: a new flow run resuming the request finds it
there, after the value of record may already have changed. PostgreSQL is corrected in one transaction together with
its audit entry (a rerun finds the entry and returns its counts); the Stripe call carries an idempotency key and a
rerun finds the fields already set. Audit entries hold field names, counts and keyed hashes, never a value.
"""

from __future__ import annotations

import pickle
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, insert, select, update

from privacy_ops import rectification
from privacy_ops.lifecycle import audit, notify, requests, verification
from privacy_ops.lifecycle.requests import Right
from privacy_ops.lifecycle.schema import audit_log, notifications, subject_snapshots
from privacy_ops.lifecycle.verification import Verification, VerificationStatus
from privacy_ops.pii import Pii
from privacy_ops.rectification import CorrectionRequest, Plan, RectificationInput, label
from privacy_ops.results import fernet
from privacy_ops.services import Services
from privacy_ops.stores import postgres, stripe_store
from tasks.lifecycle import stripe_customer_ids
from tasks.step import live_step, step

NEW_EMAIL_CODE = "new_email_code"  # email kinds of this right (privacy_ops/lifecycle/notify.py)
EMAIL_CHANGED = "email_changed"


def _record(services: Services, request_id: str, step_name: str, outcome: str, details: dict[str, Any]) -> None:
    """Audit one step once per request (a rerun finds the entry)."""
    with services.engine.begin() as connection:
        request = requests.get_request(connection, request_id)
        audit.record(
            connection,
            step=step_name,
            outcome=outcome,
            request_id=request_id,
            subject_hash=request.subject_hash,
            details=details,
            idempotency_key=f"{request_id}:{step_name}:{outcome}",
        )


def _load(services: Services, request_id: str) -> CorrectionRequest | None:
    with services.engine.connect() as connection:
        stored = connection.execute(
            select(subject_snapshots.c.payload).where(subject_snapshots.c.request_id == request_id)
        ).scalar_one_or_none()
    if stored is None:
        return None
    kept: CorrectionRequest = pickle.loads(fernet().decrypt(stored))
    return kept


def _refusals(refused: tuple[rectification.Refusal, ...]) -> dict[str, str]:
    return {refusal.field: refusal.reason for refusal in refused}


@step()
def review_corrections(
    services: Services, request_id: str, account_ids: list[int], corrections: RectificationInput | None
) -> CorrectionRequest:
    """Sort the corrections into accepted and refused by the data map, and keep them (encrypted) with the address
    on file for the rest of the request; a resumed request reloads what its first run kept."""
    kept = _load(services, request_id)
    if kept is not None:
        return kept
    if corrections is None:
        raise ValueError(f"request {request_id} has no corrections: give them, or resume a request that has")
    with services.engine.connect() as connection:
        email = postgres.subject_email(connection, services.datamap, account_ids[0])
    if email is None:
        raise LookupError("the account has no email address on file")
    reviewed = rectification.review(services.datamap, corrections, Pii(email))
    with services.engine.begin() as connection:
        connection.execute(
            insert(subject_snapshots).values(
                request_id=request_id, payload=fernet().encrypt(pickle.dumps(reviewed)), created_at=services.now()
            )
        )
        request = requests.get_request(connection, request_id)
        audit.record(
            connection,
            step="review",
            outcome="reviewed",
            request_id=request_id,
            subject_hash=request.subject_hash,
            details={
                "accepted": [accepted.field for accepted in reviewed.accepted],
                "refused": _refusals(reviewed.refused),
            },
            idempotency_key=f"{request_id}:review:reviewed",
        )
    return reviewed


@step()
def plan_changes(services: Services, request_id: str, account_ids: list[int]) -> Plan:
    """Read the values the corrections replace (after identity verification) and keep them with the request: a
    resumed run corrects copies of the same old values, even after the value of record changed."""
    kept = _load(services, request_id)
    if kept is None:
        raise LookupError(f"request {request_id} has no reviewed corrections")
    if kept.plan is not None:
        return kept.plan
    with services.engine.begin() as connection:
        customers = stripe_customer_ids(connection, services, account_ids)
        planned = rectification.plan(connection, services.datamap, kept, account_ids, customers)
        connection.execute(
            update(subject_snapshots)
            .where(subject_snapshots.c.request_id == request_id)
            .values(payload=fernet().encrypt(pickle.dumps(_with_plan(kept, planned))))
        )
        request = requests.get_request(connection, request_id)
        audit.record(
            connection,
            step="plan",
            outcome="planned",
            request_id=request_id,
            subject_hash=request.subject_hash,
            details={
                "changes": planned.corrected,
                "unchanged": list(planned.unchanged),
                "refused": _refusals(planned.refused),
                "new_email": planned.new_email is not None,
            },
            idempotency_key=f"{request_id}:plan:planned",
        )
    return planned


def _with_plan(kept: CorrectionRequest, planned: Plan) -> CorrectionRequest:
    return CorrectionRequest(kept.contact, kept.accepted, kept.refused, planned)


@step()
def forget_corrections(services: Services, request_id: str) -> None:
    """The request is over: its new and old values are no longer needed anywhere."""
    with services.engine.begin() as connection:
        connection.execute(delete(subject_snapshots).where(subject_snapshots.c.request_id == request_id))


# ------------------------------------------------------------------------------------------ the new address's code


@step()
def send_new_email_code(services: Services, request_id: str, to: Pii, lifetime_hours: float = 24) -> None:
    """Issue a one-time code for the new address (stored as a hash) and email it there, once per request."""
    key = rectification.new_email_verification_id(request_id)
    with services.engine.begin() as connection:
        state = verification.get_verification(connection, key)
        sent = connection.execute(
            select(notifications.c.status).where(
                notifications.c.request_id == request_id, notifications.c.kind == NEW_EMAIL_CODE
            )
        ).scalar_one_or_none()
        if state is not None and (state.status != VerificationStatus.pending or sent == "sent"):
            return
        code = verification.issue_code(
            connection,
            secret_key=services.secret_key,
            request_id=key,
            now=services.now(),
            lifetime=timedelta(hours=lifetime_hours),
        )
        expires_at = services.now() + timedelta(hours=lifetime_hours)
    _record(services, request_id, "verify_new_email", "code_issued", {"lifetime_hours": lifetime_hours})
    notify.send_once(
        services.engine,
        services.settings,
        request_id=request_id,
        kind=NEW_EMAIL_CODE,
        to=to,
        context={"right": Right.rectification.value, "code": code, "expires_at": expires_at},
    )


@live_step
def new_email_state(services: Services, request_id: str) -> Verification:
    """The new address's verification state (read fresh on every call)."""
    with services.engine.connect() as connection:
        state = verification.get_verification(connection, rectification.new_email_verification_id(request_id))
    if state is None:
        raise LookupError(f"request {request_id} has no new-address verification in progress")
    return state


@step(retries=0)
def check_new_email_code(services: Services, request_id: str, code: str, attempt: int) -> Verification:
    """Count one attempt at the new address's code; `attempt` keys the cache, so each is checked once per run."""
    key = rectification.new_email_verification_id(request_id)
    with services.engine.begin() as connection:
        result = verification.check_code(
            connection, secret_key=services.secret_key, request_id=key, code=code, now=services.now()
        )
    if result.attempts > attempt:  # this call counted an attempt
        _record(
            services,
            request_id,
            "verify_new_email",
            f"attempt_{result.attempts}_{result.status.value}",
            {"attempts": result.attempts, "attempts_left": result.attempts_left},
        )
    return result


@step()
def expire_new_email_code(services: Services, request_id: str) -> None:
    """Nobody entered the new address's code in time: record the expiry (the flow then denies the request)."""
    with services.engine.begin() as connection:
        verification.expire(
            connection, request_id=rectification.new_email_verification_id(request_id), now=services.now()
        )
    _record(services, request_id, "verify_new_email", "expired", {})


# ------------------------------------------------------------------------------------------------------- act


def _already_recorded(services: Services, key: str) -> dict[str, Any] | None:
    with services.engine.connect() as connection:
        return connection.execute(
            select(audit_log.c.details).where(audit_log.c.idempotency_key == key)
        ).scalar_one_or_none()


@step()
def rectify_postgres(services: Services, request_id: str, planned: Plan) -> dict[str, Any]:
    """Correct the values of record and their copies in one transaction, audited in the same transaction (keyed
    hashes of the old and new values, never the values)."""
    key = f"{request_id}:act:postgres"
    done = _already_recorded(services, key)
    if done is not None:
        return {k: v for k, v in done.items() if k != "values"}
    with services.engine.begin() as connection:
        request = requests.get_request(connection, request_id)
        result = rectification.apply(connection, services.datamap, planned)
        details = {"store": "postgres", "fields": planned.corrected, **result.summary()}
        audit.record(
            connection,
            step="act",
            outcome="postgres_rectified",
            request_id=request_id,
            subject_hash=request.subject_hash,
            details={**details, "values": rectification.hashes(services.secret_key, planned)},
            idempotency_key=key,
        )
    return details


@step()
def rectify_stripe(services: Services, request_id: str, planned: Plan) -> dict[str, Any]:
    """Correct each Stripe customer's copies of the corrected values (where they hold the old value)."""
    corrections = [
        stripe_store.CopyCorrection(change.stripe_field, change.new, change.old, change.caseless)
        for change in planned.changes
        if change.stripe_field is not None
    ]
    totals: dict[str, Any] = {"customers_corrected": 0, "fields_corrected": 0, "already": 0, "missing": 0}
    left: set[str] = set()
    for customer_id in planned.stripe_customer_ids if corrections else ():
        result = stripe_store.correct_customer(services.stripe, customer_id, corrections, request_id)
        totals["customers_corrected"] += int(bool(result.corrected))
        totals["fields_corrected"] += len(result.corrected)
        totals["already"] += len(result.already)
        totals["missing"] += int(result.missing)
        left.update(result.left)
    details = {"store": "stripe", **totals, "fields_left": sorted(left)}
    _record(services, request_id, "act", "stripe_rectified", details)
    return details


def rectification_summary(
    planned: Plan, postgres_done: dict[str, Any], stripe_done: dict[str, Any]
) -> list[dict[str, Any]]:
    """What the completion email tells the person: each field corrected, unchanged or refused (with the reason),
    and the records corrected per store. Field names and counts only."""
    summary: list[dict[str, Any]] = []
    for change in planned.changes:
        item: dict[str, Any] = {"store": label(change.field), "action": "corrected"}
        if change.new_mailbox:
            item["note"] = (
                "we write to this address from now on, and have told your previous address of the change"
            )
        summary.append(item)
    summary += [{"store": label(name), "action": "already correct, nothing changed"} for name in planned.unchanged]
    summary += [
        {"store": label(refusal.field), "action": "not corrected", "note": refusal.reason}
        for refusal in planned.refused
    ]
    summary.append(
        {"store": "CellCMS database", "action": "records corrected", "count": int(postgres_done.get("rows", 0))}
    )
    if stripe_done.get("customers_corrected"):
        summary.append(
            {
                "store": "Billing (Stripe)",
                "action": "customer record corrected",
                "count": int(stripe_done["customers_corrected"]),
            }
        )
    return summary


def refusal_reason(refused: tuple[rectification.Refusal, ...]) -> str:
    """One sentence for a denial: every field asked for, and why it cannot be corrected."""
    parts = "; ".join(f"{label(refusal.field).lower()}: {refusal.reason}" for refusal in refused)
    return f"none of the corrections you asked for can be made ({parts})"

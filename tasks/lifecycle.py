"""Steps shared by every right: intake, locate, verify identity, notify, record.

Each step changes the database and writes its audit entry in one transaction, and is idempotent on its own (a
rerun finds the request, the sent email, the recorded entry), so a rerun converges even where Prefect's result
cache cannot help (a new flow run resuming an old request).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any
from uuid import UUID

from prefect.runtime import flow_run
from sqlalchemy import select
from sqlalchemy.engine import Connection

from flows.parameters import SubjectIntake
from privacy_ops import processing
from privacy_ops.lifecycle import audit, notify, requests, verification
from privacy_ops.lifecycle.requests import Request, Right, Status
from privacy_ops.lifecycle.schema import notifications
from privacy_ops.lifecycle.schema import requests as requests_table
from privacy_ops.lifecycle.verification import Verification, VerificationStatus
from privacy_ops.pii import Pii, subject_hash
from privacy_ops.services import Services
from privacy_ops.services import services as current_services
from privacy_ops.stores import postgres, stripe_store
from privacy_ops.stores import s3 as s3_store
from tasks.step import live_step, step


def _record(
    connection: Connection,
    request: Request,
    step_name: str,
    outcome: str,
    details: dict[str, Any],
    *,
    once: bool = True,
) -> None:
    """Audit one step of a request; `once` makes a rerun record it only the first time."""
    audit.record(
        connection,
        step=step_name,
        outcome=outcome,
        request_id=request.id,
        subject_hash=request.subject_hash,
        details=details,
        idempotency_key=f"{request.id}:{step_name}:{outcome}" if once else None,
    )


@step()
def open_request(services: Services, right: Right, intake: SubjectIntake) -> str:
    """Create the request record (once per flow run) and name the flow run after it; returns the request id."""
    run_id = flow_run.get_id()
    with services.engine.begin() as connection:
        request, created = requests.open_request(
            connection,
            right=right,
            regulation=intake.regulation,
            subject_hash=subject_hash(services.secret_key, intake.identity()),
            requested_by=intake.requested_by,
            flow_run_id=run_id,
            now=services.now(),
        )
        if created:
            _record(
                connection,
                request,
                "intake",
                "received",
                {
                    "right": right.value,
                    "regulation": request.regulation.value,
                    "due_at": request.due_at.isoformat(),
                },
            )
    _name_flow_run(run_id, f"{request.id} {right.value}")
    return request.id


def _name_flow_run(run_id: str | None, name: str) -> None:
    """The UI lists runs by request id and right: no personal data in run names."""
    if run_id is None:
        return
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.update_flow_run(UUID(run_id), name=name)


@dataclass(frozen=True)
class Located:
    """What locate found: account ids and record counts per store. Nothing here identifies the person."""

    account_ids: list[int]
    postgres: dict[str, int]
    s3_objects: int
    stripe_customers: int

    @property
    def found(self) -> bool:
        return bool(self.account_ids)


@step()
def locate_subject(services: Services, request_id: str, email: Pii | None, account_id: int | None) -> Located:
    """Find the accounts and count every mapped record, revealing nothing yet. Unknown identity = no data held.

    A resumed request keeps what its first locate found: after an erasure began, the accounts are gone.
    """
    request = load_request(services, request_id)
    if "locate" in request.outcome:
        return Located(**request.outcome["locate"])
    datamap = services.datamap
    with services.engine.connect() as connection:
        account_ids = postgres.find_accounts(
            connection, datamap, email=email.reveal() if email else None, account_id=account_id
        )
        counts = postgres.count_records(connection, datamap, account_ids) if account_ids else {}
        customer_ids = stripe_customer_ids(connection, services, account_ids)
        terms = _service_terms(connection, services, account_ids)
    s3_objects = sum(
        len(s3_store.list_versions(services.s3, bucket, prefix))
        for bucket, prefix in s3_prefixes(services, account_ids)
    )
    stripe_customers = sum(
        1 for c in customer_ids if stripe_store.customer_summary(services.stripe, c) is not None
    )
    located = Located(account_ids, {t: n for t, n in counts.items() if n}, s3_objects, stripe_customers)
    with services.engine.begin() as connection:
        requests.set_accounts(connection, request_id, account_ids)
        requests.merge_outcome(connection, request_id, {"locate": asdict(located), "service_terms": terms})
        _record(
            connection,
            request,
            "locate",
            "found" if located.found else "no_data_held",
            {
                "accounts": len(account_ids),
                "postgres_rows": sum(located.postgres.values()),
                "postgres": located.postgres,
                "s3_object_versions": s3_objects,
                "stripe_customers": stripe_customers,
            },
        )
    return located


def stripe_customer_ids(connection: Connection, services: Services, account_ids: list[int]) -> list[str]:
    """The accounts' Stripe customer ids, where the data map says they are kept."""
    mapping = services.datamap.stripe
    if mapping is None or not account_ids:
        return []
    values = postgres.column_values(
        connection, services.datamap, mapping.customer_id_table, mapping.customer_id_column, account_ids
    )
    return sorted(values)


def s3_prefixes(services: Services, account_ids: list[int]) -> list[tuple[str, str]]:
    """(bucket, prefix) of every mapped S3 location of the accounts."""
    return [
        (getattr(services.settings, location.bucket_setting), location.prefix.format(account_id=account_id))
        for location in services.datamap.s3.values()
        for account_id in account_ids
    ]


@step()
def contact_address(services: Services, account_ids: list[int]) -> Pii:
    """The email address on file (never one the requester merely typed); persisted encrypted, so the completion
    email still has an address after erasure removed it."""
    with services.engine.connect() as connection:
        email = postgres.subject_email(connection, services.datamap, account_ids[0])
    if email is None:
        raise LookupError("the account has no email address on file")
    return Pii(email)


@step()
def send_verification_code(services: Services, request_id: str, to: Pii, lifetime_hours: float = 24) -> None:
    """Issue a one-time code (stored as a hash) and email it, once per request even across reruns."""
    with services.engine.begin() as connection:
        request = requests.get_request(connection, request_id)
        state = verification.get_verification(connection, request_id)
        if state is not None and (
            state.status != VerificationStatus.pending or _was_sent(connection, request_id, "verification_code")
        ):
            return
        code = verification.issue_code(
            connection,
            secret_key=services.secret_key,
            request_id=request_id,
            now=services.now(),
            lifetime=timedelta(hours=lifetime_hours),
        )
        requests.set_status(connection, request_id, Status.awaiting_verification)
        _record(
            connection,
            request,
            "verify",
            "code_issued",
            {"method": "email_code", "lifetime_hours": lifetime_hours},
        )
        expires_at = services.now() + timedelta(hours=lifetime_hours)
    notify.send_once(
        services.engine,
        services.settings,
        request_id=request_id,
        kind="verification_code",
        to=to,
        context={"right": request.right.value, "code": code, "expires_at": expires_at},
    )


def _was_sent(connection: Connection, request_id: str, kind: str) -> bool:
    status = connection.execute(
        select(notifications.c.status).where(
            notifications.c.request_id == request_id, notifications.c.kind == kind
        )
    ).scalar_one_or_none()
    return status == "sent"


@live_step
def verification_state(services: Services, request_id: str) -> Verification:
    """The current verification state (read fresh on every call)."""
    with services.engine.connect() as connection:
        state = verification.get_verification(connection, request_id)
    if state is None:
        raise LookupError(f"request {request_id} has no verification in progress")
    return state


@step(retries=0)
def check_code(services: Services, request_id: str, code: str, attempt: int) -> Verification:
    """Count one attempt at the code; `attempt` keys the cache so each attempt is checked exactly once per run."""
    with services.engine.begin() as connection:
        request = requests.get_request(connection, request_id)
        now = services.now()
        result = verification.check_code(
            connection, secret_key=services.secret_key, request_id=request_id, code=code, now=now
        )
        if result.attempts > attempt:  # this call counted an attempt (an operator may have verified meanwhile)
            outcome = f"attempt_{result.attempts}_{result.status.value}"
            _record(
                connection,
                request,
                "verify",
                outcome,
                {"attempts": result.attempts, "attempts_left": result.attempts_left},
            )
        if result.status == VerificationStatus.verified:
            requests.set_status(connection, request_id, Status.verified)
    return result


@step()
def expire_verification(services: Services, request_id: str) -> None:
    """Nobody entered the code in time: record the expiry (the flow then denies the request)."""
    with services.engine.begin() as connection:
        verification.expire(connection, request_id=request_id, now=services.now())
        _record(connection, requests.get_request(connection, request_id), "verify", "expired", {})


@step()
def notify_subject(services: Services, request_id: str, kind: str, to: Pii, context: dict[str, Any]) -> bool:
    """Send one kind of email to the person, exactly once per request; audit that it went."""
    sent = notify.send_once(
        services.engine, services.settings, request_id=request_id, kind=kind, to=to, context=context
    )
    with services.engine.begin() as connection:
        _record(connection, requests.get_request(connection, request_id), "notify", kind, {"kind": kind})
    return sent


@step()
def finish_request(services: Services, request_id: str, status: Status, outcome: dict[str, Any]) -> None:
    """Record the final status and outcome (counts per store, checks verdict, export key): never personal data.

    A completed request also records the non-discrimination check (CCPA): the service terms found at locate,
    compared with those now.
    """
    with services.engine.begin() as connection:
        request = requests.get_request(connection, request_id)
        if status == Status.completed and "service_terms" in request.outcome:
            outcome = {**outcome, "non_discrimination": _non_discrimination(connection, services, request)}
        requests.merge_outcome(connection, request_id, outcome)
        requests.set_status(connection, request_id, status, now=services.now())
        _record(connection, request, "complete", status.value, outcome)


def _service_terms(
    connection: Connection, services: Services, account_ids: list[int]
) -> dict[str, dict[str, Any]]:
    """Per account: the map's service-terms columns (plan) and what its Stripe customer pays."""
    terms = processing.service_terms(connection, services.datamap, account_ids)
    for account in terms:
        customers = stripe_customer_ids(connection, services, [int(account)])
        terms[account]["price"] = sorted(
            p for c in customers for p in stripe_store.subscription_prices(services.stripe, c)
        )
    return terms


def _non_discrimination(connection: Connection, services: Services, request: Request) -> dict[str, Any]:
    """Exercising a right must change nothing about plan, price or service level: before/after, per account still
    there (an erased account has no terms left to compare)."""
    before: dict[str, dict[str, Any]] = request.outcome["service_terms"]
    now = _service_terms(connection, services, [int(a) for a in before])
    changed = sorted(
        {
            field
            for account, terms in now.items()
            for field, value in terms.items()
            if before[account].get(field) != value
        }
    )
    verdict = "not_applicable" if not now else "unchanged" if not changed else "changed"
    return {"verdict": verdict, "accounts_checked": len(now), "changed_terms": changed}


@step()
def link_duplicate(services: Services, request_id: str) -> str | None:
    """A second request of the same right for the same account while one is open is linked to it, not acted on:
    returns the open request's id (and closes this one as duplicate), or None."""
    with services.engine.begin() as connection:
        request = requests.get_request(connection, request_id)
        if request.status == Status.duplicate:
            return str(request.outcome["duplicate_of"])
        open_id = requests.open_duplicate_of(connection, request)
        if open_id is None:
            return None
        requests.merge_outcome(connection, request_id, {"duplicate_of": open_id})
        requests.set_status(connection, request_id, Status.duplicate, now=services.now())
        _record(connection, request, "intake", "duplicate", {"duplicate_of": open_id})
    return open_id


def load_request(services: Services, request_id: str) -> Request:
    with services.engine.connect() as connection:
        return requests.get_request(connection, request_id)


@live_step
def publish_request_artifact(services: Services, request_id: str) -> None:
    """The compliance console: a markdown artifact per request with status, due date, counts and verdicts.

    Built only from the request record and audit details, which hold no personal data by construction.
    """
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    with services.engine.connect() as connection:
        request = requests.get_request(connection, request_id)
        state = verification.get_verification(connection, request_id)
    located = request.outcome.get("locate", {})
    found = [
        {"store": "postgres", "where": table, "records": n} for table, n in located.get("postgres", {}).items()
    ]
    found += [
        {"store": "s3", "where": "object versions", "records": located.get("s3_objects", 0)},
        {"store": "stripe", "where": "customers", "records": located.get("stripe_customers", 0)},
    ]
    create_table_artifact(
        key=f"request-{request.id.replace('_', '-')}-found",
        table=found,
        description=f"{request.id}: what locate found per store",
    )
    lines = [
        f"# Privacy request {request.id}: {request.right.value} ({request.regulation.value})",
        "",
        "| | |",
        "|---|---|",
        f"| Status | **{request.status.value}** |",
        f"| Received | {request.received_at:%Y-%m-%d %H:%M} UTC |",
        f"| Due | {request.due_at:%Y-%m-%d} ({request.days_left} days left) |",
        f"| Verification | {state.status.value if state else 'not started'} ({state.method if state else '-'}) |",
        f"| Accounts | {len(request.account_ids)} |",
    ]
    checks = request.outcome.get("checks")
    if checks:
        lines.append(
            f"| Great Expectations | {'passed' if checks.get('success') else 'FAILED'} "
            f"({checks.get('expectations')} expectations) |"
        )
    lines += [
        "",
        "## Outcome per store",
        "",
        "```json",
        json.dumps({k: v for k, v in request.outcome.items() if k != "checks"}, indent=2, default=str),
        "```",
    ]
    create_markdown_artifact(
        key=f"request-{request.id.replace('_', '-')}",
        markdown="\n".join(lines),
        description=f"{request.id} {request.right.value}",
    )


def record_failure(flow: Any, flow_run: Any, state: Any) -> None:
    """Flow hook: a request whose run failed is marked failed and audited (the error's class only, never its
    message), so `privacy-ops requests` shows it and a resumed run picks it up."""
    services = current_services()
    with services.engine.begin() as connection:
        request_id = connection.execute(
            select(requests_table.c.id).where(requests_table.c.flow_run_id == str(flow_run.id))
        ).scalar_one_or_none()
        if request_id is None:
            return
        request = requests.get_request(connection, request_id)
        requests.set_status(connection, request_id, Status.failed)
        error = "unknown"
        with contextlib.suppress(Exception):  # a result that cannot be loaded leaves "unknown"
            error = type(state.result(raise_on_failure=False)).__name__
        _record(connection, request, "run", "failed", {"error": error}, once=False)

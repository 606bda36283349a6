"""`privacy-ops demo`: the main job on embedded defaults, end to end, with a short report.

Starts the local stack, seeds a synthetic CellCMS, runs a request of every right for seeded people (answering
verification by reading the code from the SMTP sink, as the person would), and reports what was found, exported,
erased, retained, restricted and stopped, and the Great Expectations verdicts. Identities are never printed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from privacy_ops.stack import prefect_env, read_mail, settings_env, start_stack

Echo = Callable[[str], None]


@dataclass(frozen=True)
class DemoRequest:
    right: str
    request_id: str
    status: str
    outcome: dict[str, Any]
    seconds: float


def run_demo(accounts: int, echo: Echo) -> None:
    started = time.monotonic()
    info = start_stack(progress=echo)
    # Before anything imports Prefect: point it (and our settings) at the stack.
    os.environ.update(settings_env(info) | prefect_env(info))

    from cellcms_sandbox.database import migrate
    from cellcms_sandbox.generator import seed_sandbox
    from cellcms_sandbox.hard_cases import demo_subjects
    from privacy_ops.datamap import check_against_database
    from privacy_ops.services import services

    svc = services()
    url = svc.settings.database_url.get_secret_value()
    echo(f"seeding a synthetic CellCMS with {accounts:,} accounts (PostgreSQL, S3 files, Stripe billing) ...")
    migrate(url)
    report = seed_sandbox(
        url, svc.s3, svc.stripe, svc.settings.content_bucket, accounts, reset=True, progress=True
    )
    echo(f"  {report.summary()}")
    warnings = check_against_database(svc.datamap, svc.engine, svc.settings.datamap_path)
    echo(f"data map checked against the live database: ok ({len(warnings)} unmapped column(s) noted)")
    people = demo_subjects(url, limit=2)
    if len(people) < 2:
        raise RuntimeError("the sandbox has fewer than two people with every hard case: seed more accounts")
    others = _ordinary_accounts(svc.engine, exclude=people, count=6)

    from flows.access_request import access_request
    from flows.erasure_request import erasure_request
    from flows.know_request import know_request
    from flows.objection_request import objection_request
    from flows.opt_out_request import opt_out_request
    from flows.parameters import Objection
    from flows.portability_request import portability_request
    from flows.rectification_request import rectification_request
    from flows.restriction_request import restriction_request
    from privacy_ops.rectification import RectificationInput

    access = _run(access_request, "access", people[0], svc, echo)
    erasure = _run(erasure_request, "erasure", people[1], svc, echo)
    more = [
        _run(restriction_request, "restriction", others[0], svc, echo),
        _run(
            objection_request,
            "objection",
            others[1],
            svc,
            echo,
            objection=Objection(purposes=["analytics", "marketing"]),
        ),
        _run(opt_out_request, "opt_out", others[2], svc, echo, verify=False, global_privacy_control=True),
        _run(portability_request, "portability", others[3], svc, echo),
        _run(know_request, "know", others[4], svc, echo),
        _run(
            rectification_request,
            "rectification",
            others[5],
            svc,
            echo,
            corrections=RectificationInput.model_validate(
                {
                    "corrections": [
                        {"field": "full_name", "value": "Corrected Demo Name"},
                        {"field": "billing_address_city", "value": "Corrected City"},
                        {"field": "invoice_history", "value": "ask to change an invoice"},
                    ]
                }
            ),
        ),
    ]
    notices = _notices(others[:3], echo)
    _report(access, erasure, svc, echo)
    _report_rights(more, echo)
    _report_notices(notices, echo)
    _report_audit(svc, echo)
    echo(f"demo finished in {time.monotonic() - started:.0f} s")
    echo(f"Prefect UI (flow runs, artifacts): {info.services['prefect'].url}")
    echo("the local stack keeps running for you to explore: `privacy-ops stack down` stops it")


def _ordinary_accounts(engine: Any, *, exclude: list[int], count: int) -> list[int]:
    """Live accounts with a billing profile besides the demo's hard-case people, lowest ids first."""
    from sqlalchemy import text

    with engine.connect() as connection:
        found = list(
            connection.execute(
                text(
                    "SELECT a.id FROM accounts a JOIN billing_profiles b ON b.account_id = a.id "
                    "WHERE a.deleted_at IS NULL AND a.id <> ALL(:exclude) ORDER BY a.id LIMIT :n"
                ),
                {"exclude": exclude, "n": count},
            ).scalars()
        )
    if len(found) < count:
        raise RuntimeError(f"the sandbox has fewer than {count} more live paying accounts: seed more accounts")
    return found


def _run(
    flow_fn: Any, right: str, account_id: int, svc: Any, echo: Echo, *, verify: bool = True, **parameters: Any
) -> DemoRequest:
    """Start the request for a seeded account, enter the emailed code (when it asks), wait for the flow to end."""
    from flows.parameters import SubjectIntake
    from privacy_ops.runner import code_from_mail, final_status, find_new_request, start_flow, submit_code

    began = time.monotonic()
    intake = SubjectIntake(account_id=account_id, requested_by="privacy-ops demo")
    handle = start_flow(flow_fn, intake=intake, **parameters)
    request_id = find_new_request(svc.engine, right, handle.started_at)
    echo(
        f"{right} request {request_id} for account {account_id}"
        + (": the code goes to the address on file" if verify else "")
    )
    if verify:
        code = None
        deadline = time.monotonic() + 120
        while code is None and time.monotonic() < deadline:
            code = code_from_mail(read_mail(), request_id)
            time.sleep(0.5)
        if code is None:
            raise RuntimeError(f"no verification code arrived for {request_id}")
        state = submit_code(svc.engine, request_id, code)
        echo(f"  code read from the SMTP sink and entered: identity {state.status.value}")
    handle.wait(600)
    request = final_status(svc.engine, request_id)
    echo(f"  {request_id}: {request.status.value} in {time.monotonic() - began:.1f} s")
    return DemoRequest(right, request_id, request.status.value, request.outcome, time.monotonic() - began)


def _report(access: DemoRequest, erasure: DemoRequest, svc: Any, echo: Echo) -> None:
    from privacy_ops.export import presigned_url

    echo("")
    echo("=== report ===")
    for request in (access, erasure):
        located = request.outcome.get("locate", {})
        echo(
            f"{request.request_id} found: {sum(located.get('postgres', {}).values())} rows in "
            f"{len(located.get('postgres', {}))} tables, {located.get('s3_objects', 0)} S3 object versions, "
            f"{located.get('stripe_customers', 0)} Stripe customer(s)"
        )
    package = access.outcome.get("access_package", {})
    if package:
        echo(f"access package: s3://{package['bucket']}/{package['key']} ({package['size_bytes']:,} bytes)")
        echo(f"  link (7 days): {presigned_url(svc.s3, package['bucket'], package['key'])}")
    erased = erasure.outcome.get("erasure", {})
    tables = erased.get("postgres", {}).get("tables", {})
    echo(
        "erasure: "
        f"{sum(t['deleted'] for t in tables.values())} rows deleted, "
        f"{sum(t['anonymised'] + t['mentions_redacted'] for t in tables.values())} anonymised or redacted, "
        f"{sum(t['retained'] for t in tables.values())} retained for tax law "
        "(pseudonymised, purge date recorded); "
        f"S3 {erased.get('s3', {}).get('versions_deleted', 0)} versions + "
        f"{erased.get('s3', {}).get('delete_markers_deleted', 0)} delete markers removed; "
        f"Stripe {erased.get('stripe', {}).get('customers_deleted', 0)} customer(s) deleted"
    )
    for request in (access, erasure):
        _report_checks(request, echo)


def _report_checks(request: DemoRequest, echo: Echo) -> None:
    checks = request.outcome.get("checks", {})
    verdict = "passed" if checks.get("success") else "FAILED"
    suite, expectations = checks.get("suite", "?"), checks.get("expectations", 0)
    echo(f"  Great Expectations ({suite}): {verdict}, {expectations} expectations")


# What each right's outcome records as done: the outcome key holding rows changed per table and action.
_ACTED = {
    "restriction": "processing_restricted",
    "objection": "objection_recorded",
    "opt_out": "objection_recorded",
}


def _report_rights(requests: list[DemoRequest], echo: Echo) -> None:
    for request in requests:
        echo(f"{request.right} {request.request_id}: {request.status}; {_what_was_done(request)}")
        fairness = request.outcome.get("non_discrimination", {}).get("verdict", "not checked")
        echo(f"  non-discrimination (plan, price before/after): {fairness}")
        if "checks" in request.outcome:
            _report_checks(request, echo)


def _what_was_done(request: DemoRequest) -> str:
    """One line of counts from the request's outcome (no personal data is in an outcome)."""
    outcome = request.outcome
    package = outcome.get(f"{request.right}_package")
    if package:
        rows, tables = sum(package["rows_per_table"].values()), len(package["rows_per_table"])
        categories = f"; categories {', '.join(package['categories'])}" if "categories" in package else ""
        return f"s3://{package['bucket']}/{package['key']}: {rows} rows in {tables} tables{categories}"
    corrected = outcome.get("rectification")
    if corrected:
        places = ", ".join(corrected["postgres"].get("corrected", {}))
        stripe = corrected["stripe"].get("customers_corrected", 0) if corrected["stripe"] else 0
        refused = ", ".join(corrected["refused"]) or "none"
        return f"corrected {places or 'nothing'}, {stripe} Stripe customer(s); refused with reason: {refused}"
    done = outcome.get(_ACTED.get(request.right, ""), {})
    changes = ", ".join(
        f"{table} {action.replace('_', ' ')} {count}"
        for table, actions in done.items()
        for action, count in actions.items()
        if count
    )
    return changes or "nothing to change"


def _notices(affected: list[int], echo: Echo) -> list[dict[str, Any]]:
    """A synthetic breach of three accounts' logs, and a policy change announced to every active account."""
    from datetime import UTC, date, datetime, timedelta

    from flows.breach_notice import breach_notice
    from flows.policy_notice import policy_notice
    from privacy_ops.notices import BreachNotice, PolicyNotice

    echo("breach notice to 3 accounts, then a policy-change notice to every active account ...")
    breach = BreachNotice.model_validate(
        {
            "breach_id": f"demo-{datetime.now(UTC):%Y%m%d%H%M%S}",
            "description": "A misconfigured log export exposed access logs for six hours (demo).",
            "detected_at": datetime.now(UTC) - timedelta(hours=2),
            "likely_consequences": "Your IP addresses and access times may have been seen by others.",
            "measures_taken": "The export was closed, its credentials rotated and the storage audited.",
            "account_ids": affected,
            "categories": ["logs"],
        }
    )
    today = date.today()
    policy = PolicyNotice.model_validate(
        {
            "version": f"{today:%Y-%m-%d}",
            "effective_on": today + timedelta(days=30),
            "changes": "Section 6 now names the retention period of log data: 90 days (demo).",
        }
    )
    return [breach_notice(params=breach), policy_notice(params=policy)]


def _report_notices(notices: list[dict[str, Any]], echo: Echo) -> None:
    breach, policy = notices
    echo(
        f"breach notice {breach['notice']}: {breach['people']} people, {breach['records']} records "
        f"({', '.join(breach['categories'])}); emails {_nonzero(breach['deliveries'])}; authority summary "
        f"{breach['authority_summary']} to compliance ops (due {breach['authority_deadline'][:16]} UTC)"
    )
    echo(f"policy notice {policy['notice']}: emails {_nonzero(policy['deliveries'])}")


def _nonzero(counts: dict[str, int]) -> str:
    return ", ".join(f"{state} {n}" for state, n in counts.items() if n) or "none"


def _report_audit(svc: Any, echo: Echo) -> None:
    from privacy_ops.lifecycle import audit

    with svc.engine.connect() as connection:
        chain = audit.verify(connection)
    state = "verifies" if chain.ok else "BROKEN: " + "; ".join(chain.problems)
    echo(f"audit log: {chain.entries} entries, chain {state}")

"""Nightly retention steps: measure, act (or preview), check, tell compliance ops, record.

Thin wrappers over `privacy_ops.retention` (plain functions, batched, audited per batch): a task per rule, never
per row. A rule's step is persisted per flow run, so a retried run skips finished rules; inside a rule, finished
batches are found in the audit log, so even a new flow run resuming the same retention run id redoes nothing.
"""

from __future__ import annotations

import tempfile
from datetime import date
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from privacy_ops import checks, data_docs, retention
from privacy_ops.lifecycle import audit, notify
from privacy_ops.services import Services
from tasks.step import step


class RetentionChecksFailed(Exception):
    """Great Expectations found something past its limit; the message names rules, assets and counts only."""


def context(services: Services, run_id: str, as_of: date) -> retention.Context:
    return retention.Context(
        datamap=services.datamap,
        as_of=as_of,
        engine=services.engine,
        s3=services.s3,
        stripe=services.stripe,
        settings=services.settings,
        secret_key=services.secret_key,
        run_id=run_id,
    )


@step(retries=2, retry_delay_seconds=10)
def measure_rule(services: Services, run_id: str, as_of: date, rule: str) -> dict[str, Any]:
    """How much of its table a rule would change now: rows, total, share. Persisted like apply_rule, so a retried
    or resumed flow run keeps the share the operator approved and finds apply_rule's inputs, and result, as they
    were."""
    share = retention.measure_share(context(services, run_id, as_of), rule)
    return {"rule": rule, "table": share.table, "rows": share.rows, "total": share.total, "share": share.share}


@step(retries=2, retry_delay_seconds=10)
def apply_rule(
    services: Services,
    run_id: str,
    as_of: date,
    rule: str,
    max_share: float,
    approved: bool,
    measured: dict[str, Any],
) -> dict[str, Any]:
    """Locate and act on one rule in audited batches; returns its counts (earlier attempts' batches included).
    `measured` is measure_rule's answer just before: the rule's share is not counted again."""
    share = retention.Share(rule, measured["table"], measured["rows"], measured["total"])
    report = retention.apply_rule(
        context(services, run_id, as_of), rule, max_share=max_share, approved=approved, share=share
    )
    return report.summary()


@step(retries=0)
def preview(
    services: Services, run_id: str, as_of: date, rules: list[str], max_share: float
) -> list[dict[str, Any]]:
    """Dry run of every rule in one rolled-back transaction: exactly what the real run would change."""
    reports = retention.run_retention(context(services, run_id, as_of), rules, dry_run=True, max_share=max_share)
    return [r.summary() for r in reports]


@task(cache_policy=NO_CACHE, persist_result=False)
def check_retention(services: Services, run_id: str, as_of: date, rules: list[str]) -> dict[str, Any]:
    """The retention suite (nothing past its limit, anonymised rows clean); recorded in the audit log. Its GX Data
    Docs are published to the export bucket: the summary's "data_docs" is a presigned link to the run's page
    (None when publishing failed; the verdict stands either way)."""
    from prefect import get_run_logger

    ctx = context(services, run_id, as_of)
    leftovers = pd.DataFrame({"folder": retention.export_leftovers(ctx, rules)}, dtype=object)
    with tempfile.TemporaryDirectory(prefix="retention-docs-") as docs_dir:
        result = checks.retention_checks(
            services.settings.database_url.get_secret_value(),
            services.datamap,
            rules,
            as_of,
            leftovers,
            docs_dir=Path(docs_dir),
        )
        try:
            link: str | None = data_docs.publish(
                services.s3, services.settings.export_bucket, run_id, docs_dir, result.docs_pages
            )
        except data_docs.ExportError as error:  # names the operation and run only
            get_run_logger().warning("Data Docs not published: %s", error)
            link = None
    summary = result.summary()
    with services.engine.begin() as connection:
        audit.record(
            connection,
            step="check",
            outcome="passed" if result.success else "failed",
            request_id=None,
            subject_hash=None,
            details={"run": run_id, **summary},
            idempotency_key=None,
        )
    return {**summary, "data_docs": link}


def failure_message(verdict: dict[str, Any]) -> str:
    failed = ", ".join(f"{f['asset']}.{f['column'] or '*'} ({f['unexpected_count']})" for f in verdict["failures"])
    return f"retention checks failed: {failed}"


def report_table(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per rule: counts per store (the artifact's table and the email's lines)."""
    return [
        {
            "rule": r["rule"],
            "action": r["action"],
            "selected": r["selected"],
            **{store: r["stores"][store] for store in retention.STORES},
            "batches": r["batches"],
            "status": r.get("status", "done" if not r["dry_run"] else "preview"),
        }
        for r in reports
    ]


@task(cache_policy=NO_CACHE, persist_result=False)
def notify_compliance(
    services: Services,
    run_id: str,
    as_of: date,
    dry_run: bool,
    reports: list[dict[str, Any]],
    verdict: dict[str, Any] | None,
) -> None:
    """One summary email to compliance ops and a Prefect table artifact: counts per rule and store, the verdict."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    rows = report_table(reports)
    kind = "dry run" if dry_run else "run"
    state = "not checked (dry run)" if verdict is None else ("passed" if verdict["success"] else "FAILED")
    create_table_artifact(
        key="nightly-retention-counts",
        table=rows,
        description=f"Nightly retention {kind} {run_id}, as of {as_of.isoformat()}",
    )
    failures = "" if verdict is None or verdict["success"] else "\n\n" + failure_message(verdict)
    # A presigned link (7 days) to the run's Data Docs: suites, columns and counts, no personal data.
    link = None if verdict is None else verdict.get("data_docs")
    docs_line = "" if verdict is None else f"Data Docs (link valid 7 days): {link or 'not published'}"
    create_markdown_artifact(
        key="nightly-retention-verdict",
        markdown=f"# Nightly retention {kind}\n\nRun `{run_id}`, as of {as_of.isoformat()}. "
        f"Great Expectations: **{state}**.{failures}"
        + (f"\n\n[Great Expectations Data Docs]({link}) (link valid 7 days)" if link else ""),
        description="Great Expectations verdict of the retention run",
    )
    lines = [
        f"Nightly retention {kind} {run_id} as of {as_of.isoformat()}",
        f"Great Expectations: {state}",
        *([docs_line] if docs_line else []),
        "",
        "rule | action | selected | postgres rows | s3 versions | stripe customers | emails | status",
    ]
    lines += [
        f"{r['rule']} | {r['action']} | {r['selected']} | {r['postgres']} | {r['s3']} | {r['stripe']} | "
        f"{r['email']} | {r['status']}"
        for r in rows
    ]
    if failures:
        lines += ["", failures.strip()]
    notify.send_operator_mail(
        services.settings,
        services.settings.compliance_email,
        f"[privacy-ops] nightly retention {kind} {as_of.isoformat()}: {state}",
        "\n".join(lines) + "\n",
    )


@task(cache_policy=NO_CACHE, persist_result=False)
def record_run(
    services: Services,
    run_id: str,
    as_of: date,
    dry_run: bool,
    reports: list[dict[str, Any]],
    verdict: dict[str, Any] | None,
) -> None:
    """The run's summary in the audit log, once per retention run id (a dry run is recorded too)."""
    details = {
        "run": run_id,
        "as_of": as_of.isoformat(),
        "dry_run": dry_run,
        "rules": report_table(reports),
        "checks": None if verdict is None else {"success": verdict["success"], "failures": verdict["failures"]},
    }
    with services.engine.begin() as connection:
        audit.record(
            connection,
            step="retention_run",
            outcome="dry_run" if dry_run else ("completed" if verdict and verdict["success"] else "failed"),
            request_id=None,
            subject_hash=None,
            details=details,
            idempotency_key=None if dry_run else f"retention:{run_id}:summary",
        )

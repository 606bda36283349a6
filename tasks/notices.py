"""Steps of the breach and policy-change notices: thin wrappers over `privacy_ops.notices` (plain, batched code).

A task per batch, never per recipient; each logs its counts (no personal data). No result is cached: the
database is the record (the notice, its chosen recipients, one delivery row each), so a rerun, whether the same
flow run retried or a new run with the same breach id or version, finds what is done and does only the rest.
Steps that can only fail on bad input (open, choose) are not retried: a rejection is recorded once and final.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from privacy_ops import notices
from privacy_ops.lifecycle import notify
from privacy_ops.services import Services


def _name_flow_run(name: str) -> None:
    """Runs are listed by notice id (`breach.<id>`, `policy.<version>`): no personal data in run names."""
    run_id = flow_run.get_id()
    if run_id is None:
        return
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.update_flow_run(UUID(run_id), name=name)


@task(cache_policy=NO_CACHE, persist_result=False)
def open_notice(services: Services, params: notices.BreachNotice | notices.PolicyNotice) -> str:
    """Record the notice (or find it, on a rerun; different content is rejected); returns its id."""
    notice = notices.open_notice(services.engine, params, now=services.now())
    _name_flow_run(notice.id)
    get_run_logger().info("notice %s: %s", notice.id, "resumed" if notice.status != "open" else "recorded")
    return notice.id


@task(cache_policy=NO_CACHE, persist_result=False)
def choose_breach_recipients(services: Services, params: notices.BreachNotice) -> dict[str, Any]:
    """The affected accounts, chosen once from the ids or the data map, and the breach's assessment."""
    report = notices.select_breach_recipients(services.engine, services.datamap, params, now=services.now())
    get_run_logger().info(
        "%s: %d people, %d records in %s",
        report["notice"],
        report["people"],
        report["records"],
        ", ".join(c["category"] for c in report["categories"]),
    )
    return report


@task(cache_policy=NO_CACHE, persist_result=False)
def choose_policy_recipients(services: Services, params: notices.PolicyNotice) -> dict[str, Any]:
    """Every active account, chosen once for the version."""
    report = notices.select_policy_recipients(services.engine, services.datamap, params, now=services.now())
    get_run_logger().info("%s: %d active accounts", report["notice"], report["people"])
    return report


@task(cache_policy=NO_CACHE, persist_result=False, retries=2, retry_delay_seconds=10)
def send_notice_batch(
    services: Services, notice_id: str, batch_size: int, rate_per_second: float
) -> dict[str, Any]:
    """Claim and send the next batch (SMTP connection reused, paced); its counts."""
    report = notices.send_batch(
        services.engine,
        notify.SmtpSettings.from_settings(services.settings),
        services.datamap,
        notice_id,
        batch_size=batch_size,
        rate_per_second=rate_per_second,
        now=services.now(),
    )
    logger = get_run_logger()
    if report.unconfirmed:
        logger.warning(
            "%s: %d recipient(s) were being sent to when an earlier run died: unconfirmed, not resent",
            notice_id,
            report.unconfirmed,
        )
    if report.batch is not None:
        logger.info(
            "%s batch %d: %d sent, %d refused, %d without address, %d no longer active; %d to go",
            notice_id,
            report.batch,
            report.sent,
            report.failed,
            report.no_address,
            report.not_active,
            report.remaining,
        )
    return report.summary()


def deliver(services: Services, notice_id: str, sending: notices.Sending) -> dict[str, int]:
    """Batch after batch until nobody is left; what this run did (sent, refused, ...), summed."""
    totals = {"batches": 0, "sent": 0, "failed": 0, "no_address": 0, "not_active": 0, "unconfirmed": 0}
    while True:
        batch = send_notice_batch(services, notice_id, sending.batch_size, sending.rate_per_second)
        totals["unconfirmed"] += batch["unconfirmed"]
        if batch["batch"] is None:
            return totals
        totals["batches"] += 1
        for key in ("sent", "failed", "no_address", "not_active"):
            totals[key] += batch[key]


@task(cache_policy=NO_CACHE, persist_result=False, retries=2, retry_delay_seconds=10)
def send_authority_summary(services: Services, notice_id: str) -> bool:
    """The summary for the supervisory authority to compliance ops, once per breach; True if sent now."""
    notice = notices.get_notice_or_fail(services.engine, notice_id)
    subject, body = notices.authority_email(notice.report, services.now())
    return notify.send_operator_mail_once(
        services.engine,
        services.settings,
        key=notice_id,
        kind=notices.AUTHORITY_SUMMARY_KIND,
        to=services.settings.compliance_email,
        subject=subject,
        text=body,
    )


def artifact_key(notice_id: str) -> str:
    """Artifact keys allow a-z, 0-9 and '-': breach-<id>, policy-notice-<version>."""
    kind, _, rest = notice_id.partition(".")
    prefix = "breach" if kind == notices.BREACH else "policy-notice"
    return f"{prefix}-{rest.replace('.', '-')}"


@task(cache_policy=NO_CACHE, persist_result=False)
def publish_breach_artifact(services: Services, notice_id: str, with_deliveries: bool) -> None:
    """The supervisory authority's summary as a markdown artifact (with delivery counts once sending ran)."""
    from prefect.artifacts import create_markdown_artifact

    notice = notices.get_notice_or_fail(services.engine, notice_id)
    counts = None
    if with_deliveries:
        with services.engine.connect() as connection:
            counts = notices.delivery_counts(connection, notice_id)
    create_markdown_artifact(
        key=artifact_key(notice_id),
        markdown=notices.authority_markdown(notice.report, counts, services.now()),
        description=f"Personal data breach {notice.report['breach_id']}: summary for the supervisory authority",
    )


@task(cache_policy=NO_CACHE, persist_result=False)
def publish_policy_artifact(services: Services, notice_id: str, counts: dict[str, int]) -> None:
    """Who was told of the version, as counts per delivery status."""
    from prefect.artifacts import create_table_artifact

    notice = notices.get_notice_or_fail(services.engine, notice_id)
    create_table_artifact(
        key=artifact_key(notice_id),
        table=[{"status": status, "accounts": n} for status, n in counts.items() if n],
        description=(
            f"Privacy policy version {notice.content['version']} (effective {notice.content['effective_on']}): "
            "notice deliveries"
        ),
    )


@task(cache_policy=NO_CACHE, persist_result=False, retries=2, retry_delay_seconds=5)
def finish_notice(services: Services, notice_id: str) -> dict[str, int]:
    """Counts per delivery status; the notice recorded completed (once) when nobody is left to send to."""
    counts = notices.finish_notice(services.engine, notice_id, now=services.now())
    get_run_logger().info(
        "%s: %s", notice_id, ", ".join(f"{n} {status.replace('_', ' ')}" for status, n in counts.items() if n)
    )
    return counts

"""Nightly retention: every time limit of the privacy policy (sections 6 and 8), enforced from the data map.

For each rule of `datamap/cellcms.yaml` (retention.rules, in order): measure what it would change; above
`max_share` of its table, wait for an operator's approval (pause when run locally, suspend when deployed); act in
audited batches. Then prove it with Great Expectations (nothing past its limit remains, anonymised rows hold no IP
or email; its Data Docs published to the export bucket under data-docs/<run id>/), tell compliance ops (one
email, a Prefect table artifact, both with a 7-day link to the Data Docs), and record the run in the audit log.
A dry run previews every rule in one rolled-back transaction and changes nothing. A failed check fails the run,
after compliance ops were told.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

from prefect import flow, get_run_logger
from prefect.input import RunInput
from prefect.runtime import flow_run
from pydantic import BaseModel, ConfigDict, Field, field_validator

from flows.lifecycle import wait_for
from privacy_ops import retention
from privacy_ops.services import services as connect
from tasks.retention import (
    RetentionChecksFailed,
    apply_rule,
    check_retention,
    failure_message,
    measure_rule,
    notify_compliance,
    preview,
    record_run,
)

APPROVAL_TIMEOUT_SECONDS = 6 * 3600


class RetentionRun(BaseModel):
    """What to run: the UI's form for manual runs; the nightly schedule uses the defaults."""

    model_config = ConfigDict(extra="forbid")

    rules: list[str] = Field(default_factory=list, description="Rules to include (empty: every rule of the map)")
    dry_run: bool = Field(default=False, description="Report what would change per rule and store; change nothing")
    as_of: date | None = Field(default=None, description="The run's date (default today); never in the future")
    max_share: float = Field(
        default=retention.DEFAULT_MAX_SHARE,
        gt=0,
        le=1,
        description="A rule changing more than this share of a table waits for approval",
    )
    resume_run_id: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="Continue an interrupted retention run (its finished batches are not redone)",
    )

    @field_validator("as_of")
    @classmethod
    def _not_future(cls, value: date | None) -> date | None:
        if value is not None:
            retention.check_as_of(value)
        return value


class Approval(RunInput):
    """An operator's answer to a rule that would change an unusual share of a table."""

    approve: bool = Field(description="Apply the rule anyway (false: skip it in this run)")
    approved_by: str = Field(min_length=1, max_length=100, description="Who decided")


def _ask_approval(rule: str, measured: dict[str, Any], max_share: float) -> bool:
    logger = get_run_logger()
    logger.warning(
        "rule %s would change %d of %d rows of %s (%.0f%% > %.0f%%): waiting for approval",
        rule,
        measured["rows"],
        measured["total"],
        measured["table"],
        100 * measured["share"],
        100 * max_share,
    )
    answer = wait_for(Approval, key=f"approve-{rule}", timeout=APPROVAL_TIMEOUT_SECONDS)
    logger.info("rule %s %s by %s", rule, "approved" if answer.approve else "rejected", answer.approved_by)
    return answer.approve


def _skipped(rule: str, measured: dict[str, Any]) -> dict[str, Any]:
    return {
        "rule": rule,
        "action": "skipped",
        "dry_run": False,
        "selected": 0,
        "stores": dict.fromkeys(retention.STORES, 0),
        "tables": {},
        "batches": 0,
        "share": measured["share"],
        "status": "rejected",
    }


@flow(name="nightly-retention", log_prints=False)
def nightly_retention(params: RetentionRun | None = None) -> list[dict[str, Any]]:
    """Run the retention rules; returns the counts per rule and store."""
    params = params or RetentionRun()
    services = connect()
    as_of = retention.check_as_of(params.as_of or datetime.now(UTC).date())
    names = retention.rule_names(services.datamap, params.rules)
    run_id = params.resume_run_id or str(flow_run.get_id() or f"local-{datetime.now(UTC):%Y%m%dT%H%M%S}")

    if params.dry_run:
        reports = preview(services, run_id, as_of, names, params.max_share)
        verdict = None
    else:
        reports = []
        for name in names:
            measured = measure_rule(services, run_id, as_of, name)
            approved = measured["share"] > params.max_share and _ask_approval(name, measured, params.max_share)
            if measured["share"] > params.max_share and not approved:
                reports.append(_skipped(name, measured))
                continue
            reports.append(apply_rule(services, run_id, as_of, name, params.max_share, approved, measured))
        # A rule an operator rejected is reported as skipped; the checks prove the rules that ran.
        applied = [r["rule"] for r in reports if r.get("status") != "rejected"]
        verdict = check_retention(services, run_id, as_of, applied)

    notify_compliance(services, run_id, as_of, params.dry_run, reports, verdict)
    record_run(services, run_id, as_of, params.dry_run, reports, verdict)
    if verdict is not None and not verdict["success"]:
        raise RetentionChecksFailed(failure_message(verdict))
    return reports

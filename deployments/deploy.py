"""Deployments of every flow to a `process` work pool: what compliance ops start from the Prefect UI.

`privacy-ops deploy` calls `deploy_all`. Each deployment loads its flow from this project's directory, so a worker
started from the same checkout (or an image of it) runs it. Parameters are the flows' typed models, so the UI
renders forms and the server rejects invalid input before a run starts. A deployed request run waiting for its
verification code is suspended: it holds no worker until the code is entered.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

PROJECT_ROOT = Path(__file__).resolve().parent.parent
WORK_POOL = "privacy-ops"


# The nightly schedule: configurable, in the data's own time zone (CellCMS stores data in the EU).
RETENTION_CRON = os.environ.get("PRIVACY_OPS_RETENTION_CRON", "0 2 * * *")
RETENTION_TIMEZONE = os.environ.get("PRIVACY_OPS_RETENTION_TIMEZONE", "Europe/Berlin")
# The daily operations jobs, in the same time zone: the watchdog before the office opens, hygiene after retention.
WATCHDOG_CRON = os.environ.get("PRIVACY_OPS_WATCHDOG_CRON", "0 7 * * *")
HYGIENE_CRON = os.environ.get("PRIVACY_OPS_HYGIENE_CRON", "30 3 * * *")


@dataclass(frozen=True)
class Deployment:
    name: str
    entrypoint: str  # path:function, relative to the project root
    description: str
    tags: tuple[str, ...]
    cron: str | None = None  # runs on this schedule (in RETENTION_TIMEZONE) besides manual runs


DEPLOYMENTS: tuple[Deployment, ...] = (
    Deployment(
        "access-request",
        "flows/access_request.py:access_request",
        "Right of access / right to know: a copy of every mapped record, delivered by an expiring link.",
        ("privacy-request", "access"),
    ),
    Deployment(
        "erasure-request",
        "flows/erasure_request.py:erasure_request",
        "Right to erasure / right to delete: remove everything the law lets us remove, then prove it.",
        ("privacy-request", "erasure"),
    ),
    Deployment(
        "rectification-request",
        "flows/rectification_request.py:rectification_request",
        "Right to rectification: correct named fields everywhere the data map holds them; a new email is "
        "confirmed by a code sent to it first.",
        ("privacy-request", "rectification"),
    ),
    Deployment(
        "portability-request",
        "flows/portability_request.py:portability_request",
        "Right to data portability: what the person provided, as JSON, CSV and original files, by link.",
        ("privacy-request", "portability"),
    ),
    Deployment(
        "know-request",
        "flows/know_request.py:know_request",
        "CCPA right to know: categories held (sources, purposes, recipients) and 12 months of data, by link.",
        ("privacy-request", "know"),
    ),
    Deployment(
        "restriction-request",
        "flows/restriction_request.py:restriction_request",
        "Right to restriction: keep the data, take the account out of every restrictable processing, prove it.",
        ("privacy-request", "restriction"),
    ),
    Deployment(
        "lift-restriction",
        "flows/lift_restriction.py:lift_restriction",
        "Lift a completed restriction: the person is told first, then it is lifted and recorded.",
        ("operations", "lift-restriction"),
    ),
    Deployment(
        "objection-request",
        "flows/objection_request.py:objection_request",
        "Right to object: stop the named purposes, delete what was collected for them only, withdraw consent.",
        ("privacy-request", "objection"),
    ),
    Deployment(
        "opt-out-request",
        "flows/opt_out_request.py:opt_out_request",
        "CCPA opt-out of sale/sharing (and Global Privacy Control): recorded, sharing flags off, no code asked.",
        ("privacy-request", "opt-out"),
    ),
    Deployment(
        "breach-notice",
        "flows/breach_notice.py:breach_notice",
        "Personal data breach: email every affected person once; summary for the supervisory authority (72 h).",
        ("notice", "breach"),
    ),
    Deployment(
        "policy-notice",
        "flows/policy_notice.py:policy_notice",
        "A new privacy policy version: email every active account once per version.",
        ("notice", "policy"),
    ),
    Deployment(
        "nightly-retention",
        "flows/nightly_retention.py:nightly_retention",
        "Every time limit of the privacy policy, enforced set-based and verified; manual runs may be dry runs.",
        ("retention",),
        cron=RETENTION_CRON,
    ),
    Deployment(
        "deadline-watchdog",
        "flows/deadline_watchdog.py:deadline_watchdog",
        "Requests due within 7 days or overdue: one email to compliance ops, a Prefect event per request.",
        ("operations", "watchdog"),
        cron=WATCHDOG_CRON,
    ),
    Deployment(
        "orchestrator-hygiene",
        "flows/orchestrator_hygiene.py:orchestrator_hygiene",
        "Delete finished request flow runs (and their logs) from Prefect after 30 days; manual runs may be dry.",
        ("operations", "hygiene"),
        cron=HYGIENE_CRON,
    ),
)


def ensure_work_pool(name: str = WORK_POOL) -> None:
    """Create the process work pool if it does not exist yet."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    # Already there: nothing to do.
    with get_client(sync_client=True) as client, contextlib.suppress(ObjectAlreadyExists):
        client.create_work_pool(WorkPoolCreate(name=name, type="process"))


def deploy_all(work_pool: str = WORK_POOL) -> list[str]:
    """Create or update every deployment; returns their full names ("flow/deployment")."""
    from prefect import Flow
    from prefect.schedules import Cron

    ensure_work_pool(work_pool)
    names = []
    for deployment in DEPLOYMENTS:
        # Called from synchronous code, from_source returns the flow itself (its type also admits a coroutine).
        flow = cast(Flow[..., Any], Flow.from_source(source=str(PROJECT_ROOT), entrypoint=deployment.entrypoint))
        flow.deploy(
            name=deployment.name,
            work_pool_name=work_pool,
            description=deployment.description,
            tags=list(deployment.tags),
            schedules=[Cron(deployment.cron, timezone=RETENTION_TIMEZONE)] if deployment.cron else None,
            print_next_steps=False,
        )
        names.append(f"{flow.name}/{deployment.name}")
    return names

"""Breach notification (privacy policy section 3: "promptly notifying affected users in the event of a breach").

record the notice -> choose the affected accounts (ids, or the data map's tables and categories) and assess the
breach -> tell compliance ops what the supervisory authority needs within 72 hours (email once, artifact, stored
record) -> email every affected person, batch by batch, each once -> record the outcome.
Rerun it with the same breach id to resume: nobody who was sent the notice is sent it again.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from privacy_ops.notices import BreachNotice
from privacy_ops.services import services as connect
from tasks.notices import (
    choose_breach_recipients,
    deliver,
    finish_notice,
    open_notice,
    publish_breach_artifact,
    send_authority_summary,
)


@flow(name="breach-notice", log_prints=False)
def breach_notice(params: BreachNotice) -> dict[str, Any]:
    """Notify everyone a personal data breach affects, once each; returns the assessment and delivery counts."""
    services = connect()
    notice_id = open_notice(services, params)
    assessment = choose_breach_recipients(services, params)
    summary_sent = send_authority_summary(services, notice_id)
    publish_breach_artifact(services, notice_id, with_deliveries=False)
    this_run = deliver(services, notice_id, params)
    counts = finish_notice(services, notice_id)
    publish_breach_artifact(services, notice_id, with_deliveries=True)
    return {
        "notice": notice_id,
        "people": assessment["people"],
        "records": assessment["records"],
        "categories": [c["category"] for c in assessment["categories"]],
        "authority_deadline": assessment["authority_deadline"],
        "authority_summary": "sent" if summary_sent else "already_sent",
        "this_run": this_run,
        "deliveries": counts,
    }

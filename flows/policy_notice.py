"""Policy-change notice (privacy policy section 9: "we may also send a notification via email").

record the version -> choose every active account once -> email each, batch by batch, once per version -> record
who was told of which version. Rerun it with the same version to resume; a new version reaches everyone again.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from privacy_ops.notices import PolicyNotice
from privacy_ops.services import services as connect
from tasks.notices import choose_policy_recipients, deliver, finish_notice, open_notice, publish_policy_artifact


@flow(name="policy-notice", log_prints=False)
def policy_notice(params: PolicyNotice) -> dict[str, Any]:
    """Tell every active account about a new privacy policy version, once each; returns the delivery counts."""
    services = connect()
    notice_id = open_notice(services, params)
    chosen = choose_policy_recipients(services, params)
    this_run = deliver(services, notice_id, params)
    counts = finish_notice(services, notice_id)
    publish_policy_artifact(services, notice_id, counts)
    return {
        "notice": notice_id,
        "version": params.version,
        "people": chosen["people"],
        "this_run": this_run,
        "deliveries": counts,
    }

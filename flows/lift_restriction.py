"""Lifting a restriction of processing (GDPR art. 18(3)): tell the person first, then lift it, and record it.

Started by compliance ops (not a request of the person): the restriction request's id, the reason and who lifts
it. The notice and the lifting are recorded under the restriction request.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.lifecycle import REQUEST_FLOW
from flows.parameters import LiftRestriction
from privacy_ops.lifecycle.requests import Right, Status
from privacy_ops.services import services as connect
from tasks.lifecycle import contact_address, load_request, notify_subject, publish_request_artifact
from tasks.processing import lift_restriction as lift

RIGHT = Right.restriction


class NotLiftable(ValueError):
    """The request named is not a completed restriction request (the message names only its id and state)."""


@flow(name="lift-restriction", **REQUEST_FLOW)
def lift_restriction(lifting: LiftRestriction) -> str:
    """Lift a completed restriction: returns 'lifted'."""
    services = connect()
    request = load_request(services, lifting.restriction_request_id)
    if request.right != RIGHT or request.status != Status.completed:
        raise NotLiftable(
            f"{request.id} is a {request.right.value} request with status {request.status.value}: "
            "only a completed restriction request can be lifted"
        )
    accounts = list(request.account_ids)
    notify_subject(
        services,
        request.id,
        "restriction_lifting",
        contact_address(services, accounts),
        {"right": RIGHT.value, "reason": lifting.reason},
    )
    lift(services, request.id, accounts, lifting.lifted_by)
    get_run_logger().info("request %s: restriction lifted", request.id)
    publish_request_artifact(services, request.id)
    return "lifted"

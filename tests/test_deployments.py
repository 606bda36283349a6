"""Deployments: every one loads and validates; a deployed request suspends while it waits for its code (holding no
worker) and finishes after the code is entered, run by a real process worker against the stack's Prefect server."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from typing import Any

import pytest
from sqlalchemy import Engine, text

from deployments.deploy import DEPLOYMENTS, PROJECT_ROOT, WORK_POOL, deploy_all
from privacy_ops.lifecycle.requests import Status
from privacy_ops.runner import code_from_mail, final_status, submit_code
from privacy_ops.settings import Settings
from tests.conftest import wait_for


def test_every_deployment_loads_with_a_validating_form() -> None:
    from prefect import Flow
    from prefect.exceptions import ParameterTypeError

    for deployment in DEPLOYMENTS:
        flow: Any = Flow.from_source(source=str(PROJECT_ROOT), entrypoint=deployment.entrypoint)
        definitions = flow.parameters.model_dump()["definitions"]
        if "privacy-request" in deployment.tags:
            intake = definitions["SubjectIntake"]["properties"]
            assert intake["email"]["anyOf"][0]["pattern"], "the UI must reject a malformed email"
            assert set(intake) == {"email", "account_id", "regulation", "requested_by"}
            if "objection" in deployment.tags:
                assert definitions["Objection"]["properties"]["purposes"]["minItems"] == 1
        elif "notice" in deployment.tags:
            model = "BreachNotice" if "breach" in deployment.tags else "PolicyNotice"
            assert {"batch_size", "rate_per_second"} <= set(definitions[model]["properties"])
            with pytest.raises(ParameterTypeError):
                flow.validate_parameters({"params": {}})
        elif "lift-restriction" in deployment.tags:
            form = definitions["LiftRestriction"]["properties"]
            assert form["restriction_request_id"]["pattern"] and form["reason"]["minLength"] == 10
            with pytest.raises(ParameterTypeError):
                flow.validate_parameters(
                    {"lifting": {"restriction_request_id": "x", "reason": "r", "lifted_by": "o"}}
                )
        elif "retention" in deployment.tags:
            assert deployment.cron is not None, "retention runs on a schedule"
            assert {"dry_run", "as_of"} <= set(definitions["RetentionRun"]["properties"])
        elif "watchdog" in deployment.tags:
            assert deployment.cron is not None, "the watchdog runs daily"
            form = definitions["WatchdogRun"]["properties"]
            assert {"as_of", "window_days"} == set(form)
            assert form["window_days"]["default"] == 7 and form["window_days"]["minimum"] == 1
            with pytest.raises(ParameterTypeError, match="future"):
                flow.validate_parameters({"params": {"as_of": "2999-01-01"}})
        elif "hygiene" in deployment.tags:
            assert deployment.cron is not None, "hygiene runs daily"
            form = definitions["HygieneRun"]["properties"]
            assert {"older_than_days", "dry_run", "batch_size"} <= set(form)
            assert form["older_than_days"]["default"] == 30
            assert form["older_than_days"]["exclusiveMinimum"] == 0, "the UI must reject a period of 0 days"
            with pytest.raises(ParameterTypeError):
                flow.validate_parameters({"params": {"older_than_days": 0}})
        else:
            pytest.fail(f"{deployment.name}: no form check for this kind of deployment (tags {deployment.tags})")


@pytest.fixture(scope="module")
def worker(stack: Any) -> Iterator[subprocess.Popen[bytes]]:
    """A real process worker polling the privacy-ops pool (every second, to keep the test short)."""
    deploy_all()
    env = os.environ | {"PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", WORK_POOL, "--type", "process"],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    yield process
    process.terminate()  # stopped before the stack's server (a worker without a server ignores SIGTERM)
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()


def _state(flow_run_id: Any) -> Any:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id).state


def test_a_deployed_request_suspends_for_its_code_then_completes(
    cellcms: Settings,
    engine: Engine,
    worker: subprocess.Popen[bytes],
    read_mail: Callable[[], list[EmailMessage]],
) -> None:
    from prefect.deployments import run_deployment

    flow_run = run_deployment(
        "access-request/access-request",
        parameters={"intake": {"account_id": 5, "requested_by": "test"}},
        timeout=0,
    )
    wait_for(lambda: _state(flow_run.id).is_paused(), 180, "the run to suspend for its code")
    assert _state(flow_run.id).name == "Suspended"
    with engine.connect() as connection:
        request_id = connection.execute(
            text("SELECT id FROM privacy_ops.requests WHERE flow_run_id = :f"), {"f": str(flow_run.id)}
        ).scalar_one()
    code = code_from_mail(read_mail(), request_id)
    assert code is not None

    assert submit_code(engine, request_id, code, timeout=180).status.value == "verified"
    wait_for(lambda: _state(flow_run.id).is_final(), 300, "the resumed run to finish")

    assert _state(flow_run.id).is_completed()
    assert final_status(engine, request_id).status == Status.completed
    sent = [str(m["Subject"]) for m in read_mail() if request_id in str(m["Subject"])]
    assert len(sent) == 3 and len(set(sent)) == 3  # acknowledgement, code, completion: once each across the rerun
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    key = f"request-{request_id.replace('_', '-')}"
    with get_client(sync_client=True) as client:
        named = client.read_flow_run(flow_run.id).name
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key, f"{key}-found"]))
        )
    assert named == f"{request_id} access"  # the UI lists it by request id, no personal data
    console = {a.type: str(a.data) for a in artifacts}
    assert set(console) == {"markdown", "table"}
    assert "**completed**" in console["markdown"] and "passed" in console["markdown"]
    assert "postgres" in console["table"]

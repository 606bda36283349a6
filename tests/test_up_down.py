"""`privacy-ops up` / `down` in a separate PRIVACY_OPS_HOME: the stack, the blocks, every deployment and a real
process worker come up; the nightly retention deployment runs from its schedule; `down` leaves nothing behind.

One `up` serves the module (the Prefect server is the slow part); the tests run in file order and the last one
takes everything down. The session stack (conftest `stack`) is not used.
"""

from __future__ import annotations

import os
import socket
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil
import pytest
import typer
from typer.testing import CliRunner

from deployments.deploy import DEPLOYMENTS, WORK_POOL
from privacy_ops import operations
from privacy_ops.cli_up import register
from privacy_ops.settings import ENVIRONMENT, load_settings
from privacy_ops.stack import read_stack
from tests.conftest import wait_for

# Test-only speed-ups, inherited by the stack's Prefect server and the worker from the environment.
FAST = {
    "PREFECT_WORKER_QUERY_SECONDS": "1",
    "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
}
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _cli() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh PRIVACY_OPS_HOME with nothing inherited from the session stack (its exported settings would make
    every service "external")."""
    path = tmp_path_factory.mktemp("up-down") / "home"
    with pytest.MonkeyPatch.context() as patch:
        for variable in [*(v for v, _ in ENVIRONMENT.values()), "PREFECT_API_URL", "PRIVACY_OPS_BLOCKS"]:
            patch.delenv(variable, raising=False)
        patch.setenv("PRIVACY_OPS_HOME", str(path))
        for name, value in FAST.items():
            patch.setenv(name, value)
        try:
            yield path
        finally:
            operations.down(wipe=True)  # whatever happened, leave no server behind


@pytest.fixture(scope="module")
def upped(home: Path) -> operations.UpResult:
    return operations.up()


def _get(url: str) -> tuple[int, str]:
    with _NO_PROXY.open(url, timeout=10) as response:
        return int(response.status), response.read().decode(errors="replace")


def _port_listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def test_up_serves_the_ui_deploys_everything_and_runs_a_worker(upped: operations.UpResult, home: Path) -> None:
    from prefect.client.orchestration import get_client

    assert not upped.already_up and upped.worker_started
    assert upped.ui_url == upped.stack.services["prefect"].url
    status, page = _get(upped.ui_url)
    assert status == 200 and "<html" in page.lower()
    assert _get(f"{upped.ui_url}/api/health") == (200, "true")

    with operations._prefect_at(upped.stack), get_client(sync_client=True) as client:
        deployed = {d.name for d in client.read_deployments()}
        pool = client.read_work_pool(WORK_POOL)
    assert deployed == {d.name for d in DEPLOYMENTS}
    assert pool.type == "process"
    assert len(operations.pool_workers(upped.stack)) == 1  # one worker, polling
    assert len(upped.blocks) == 5

    # The worker finds the stack's settings: PRIVACY_OPS_HOME is in its environment.
    worker_env = psutil.Process(upped.worker.pid).environ()
    assert worker_env["PRIVACY_OPS_HOME"] == str(home.resolve())
    assert worker_env["PREFECT_API_URL"] == upped.stack.prefect_api_url

    again = CliRunner().invoke(_cli(), ["up"])
    assert again.exit_code == 0, again.output
    assert f"already up: worker pid {upped.worker.pid}" in again.output
    assert f"Prefect UI: {upped.ui_url}" in again.output
    assert len(operations.pool_workers(upped.stack)) == 1  # no second worker


def _seed(accounts: int) -> None:
    import boto3
    import stripe
    from botocore.config import Config

    from cellcms_sandbox.database import migrate
    from cellcms_sandbox.generator import seed_sandbox

    settings = load_settings()
    url = settings.database_url.get_secret_value()
    s3 = boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        region_name=settings.s3_region,
        aws_access_key_id=settings.s3_access_key_id,
        aws_secret_access_key=(
            settings.s3_secret_access_key.get_secret_value() if settings.s3_secret_access_key else None
        ),
        config=Config(s3={"addressing_style": "path"}),
    )
    assert settings.stripe_api_base
    client = stripe.StripeClient(
        settings.stripe_api_key.get_secret_value(), base_addresses={"api": settings.stripe_api_base}
    )
    migrate(url)
    seed_sandbox(
        url,
        s3,
        client,
        settings.content_bucket,
        accounts,
        reset=True,
        progress=False,
        s3_accounts=accounts,
        stripe_accounts=accounts,
    )


def test_nightly_retention_runs_from_its_schedule(upped: operations.UpResult) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.schedules import IntervalSchedule

    _seed(30)  # accounts 21..24 carry the retention cases
    with operations._prefect_at(upped.stack), get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("nightly-retention/nightly-retention")
        [schedule] = deployment.schedules  # the nightly cron
        # Move the schedule to fire in a few seconds (then hourly); the scheduler service creates the run, the
        # worker picks it up. The tiny sandbox would exceed the default max_share and wait for approval.
        first = datetime.now(UTC) + timedelta(seconds=5)
        client.update_deployment_schedule(
            deployment.id,
            schedule.id,
            schedule=IntervalSchedule(interval=timedelta(hours=1), anchor_date=first),
            parameters={"params": {"max_share": 1.0}},
        )
        by_deployment = DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))

        def finished() -> list[Any]:
            runs = client.read_flow_runs(deployment_filter=by_deployment)
            failed = [r for r in runs if r.state and r.state.is_final() and not r.state.is_completed()]
            assert not failed, f"a scheduled run ended {failed[0].state.name}: {failed[0].state.message}"
            return [r for r in runs if r.state and r.state.is_completed()]

        [run] = wait_for(finished, 150, "a scheduled nightly-retention run to complete")
    assert run.auto_scheduled, "created by the scheduler, not by run_deployment"
    assert run.idempotency_key and run.idempotency_key.startswith("scheduled ")
    assert run.expected_start_time is not None and run.expected_start_time >= first - timedelta(seconds=1)
    assert run.parameters["params"]["max_share"] == 1.0


def test_down_leaves_no_process_and_no_port(upped: operations.UpResult, home: Path) -> None:
    info = read_stack()
    assert info is not None
    worker = operations.read_worker()
    assert worker is not None and worker.alive()
    pids = {name: svc.pid for name, svc in info.services.items() if svc.pid}
    pids["worker"] = worker.pid
    pids |= {f"worker child {p.pid}": p.pid for p in psutil.Process(worker.pid).children(recursive=True)}
    ports = {name: svc.port for name, svc in info.services.items() if svc.port}
    assert set(ports) == {"postgres", "s3", "stripe", "smtp", "prefect"}

    result = CliRunner().invoke(_cli(), ["down"])
    assert result.exit_code == 0, result.output
    assert "stopped worker, postgres, s3, stripe, smtp, prefect" in result.output
    assert result.output.index("stopping the worker") < result.output.index("stopping postgres")

    alive = {name: pid for name, pid in pids.items() if psutil.pid_exists(pid) and _not_zombie(pid)}
    assert alive == {}
    mentioning = [
        p.info["cmdline"]
        for p in psutil.process_iter(["cmdline"])
        if p.pid != os.getpid() and str(home.resolve()) in " ".join(p.info["cmdline"] or [])
    ]
    assert mentioning == []
    assert {name: port for name, port in ports.items() if _port_listening(port)} == {}
    assert read_stack() is None and operations.read_worker() is None
    assert operations.is_up() is False
    assert "nothing was running" in CliRunner().invoke(_cli(), ["down"]).output


def _not_zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False

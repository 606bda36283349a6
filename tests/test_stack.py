"""The local stack: every service answers for real, `down` leaves nothing behind, external settings are honoured.

The session stack (conftest `stack`) serves the first tests. Tests that start or stop a stack use their own
PRIVACY_OPS_HOME and a subset of services without Prefect (slow to start), so the session stack is never touched.
"""

from __future__ import annotations

import json
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import psutil
import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from privacy_ops import stack as stack_module
from privacy_ops.settings import ENVIRONMENT, PROJECT_ROOT, Settings, read_stack_values, stack_file
from privacy_ops.stack import StackInfo, read_stack, stack_status, start_stack, stop_stack

SMALL = ["postgres", "s3", "stripe", "smtp"]  # everything but Prefect, which takes ~10-25 s to start


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def _port_listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _group_alive(pgid: int) -> list[psutil.Process]:
    alive = []
    for process in psutil.process_iter(["status"]):
        try:
            if os.getpgid(process.pid) == pgid and process.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except (OSError, psutil.Error):
            continue
    return alive


@pytest.fixture
def other_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A second, separate PRIVACY_OPS_HOME for tests that start and stop their own stack."""
    home = tmp_path / "other-stack"
    monkeypatch.setenv("PRIVACY_OPS_HOME", str(home))
    try:
        yield home
    finally:
        stop_stack(wipe=True)  # whatever the test did, leave no server behind


# --- the session stack ---------------------------------------------------------------------------------------


def test_postgres_answers(engine: Engine) -> None:
    with engine.connect() as connection:
        assert connection.execute(text("SELECT 1")).scalar_one() == 1
        assert connection.execute(text("SELECT current_database()")).scalar_one() == "cellcms"
        # builtin C.UTF-8 locale: lower() folds non-ASCII letters (emails and names are compared lower-cased)
        assert connection.execute(text("SELECT lower('ÄÖÜ@Example.COM')")).scalar_one() == "äöü@example.com"


def _create_bucket(s3: Any, name: str) -> None:
    # Outside us-east-1, S3 (and moto) require the region as location constraint.
    region = s3.meta.region_name
    s3.create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": region})


def test_s3_versioned_bucket_round_trip(s3: Any, reset_services: None) -> None:
    _create_bucket(s3, "stack-test")
    s3.put_bucket_versioning(Bucket="stack-test", VersioningConfiguration={"Status": "Enabled"})
    first = s3.put_object(Bucket="stack-test", Key="a/file.txt", Body=b"one")["VersionId"]
    s3.put_object(Bucket="stack-test", Key="a/file.txt", Body=b"two")
    assert s3.get_object(Bucket="stack-test", Key="a/file.txt")["Body"].read() == b"two"
    assert s3.get_object(Bucket="stack-test", Key="a/file.txt", VersionId=first)["Body"].read() == b"one"
    assert len(s3.list_object_versions(Bucket="stack-test", Prefix="a/")["Versions"]) == 2


def test_reset_services_empties_s3_stripe_and_mail(
    s3: Any, stripe_client: Any, settings: Settings, read_mail: Callable[[], list[EmailMessage]], stack: StackInfo
) -> None:
    _create_bucket(s3, "to-be-reset")
    stripe_client.v1.customers.create(params={"email": "reset@example.com"})
    _send(settings, "reset me")
    stack_module.reset_service_data(stack)
    assert s3.list_buckets()["Buckets"] == []
    assert stripe_client.v1.customers.list().data == []
    assert read_mail() == []


def test_stripe_customer(stripe_client: Any, reset_services: None) -> None:
    created = stripe_client.v1.customers.create(params={"email": "ada@example.com", "name": "Ada"})
    fetched = stripe_client.v1.customers.retrieve(created.id)
    assert fetched.email == "ada@example.com"
    found = stripe_client.v1.customers.list(params={"email": "ada@example.com"}).data
    assert [customer.id for customer in found] == [created.id]


def _send(settings: Settings, subject: str) -> None:
    message = EmailMessage()
    message["From"] = settings.mail_from
    message["To"] = "zoë@example.com"
    message["Subject"] = subject
    message.set_content("Grüße")
    with smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=10) as smtp:
        smtp.send_message(message)


def test_smtp_message_lands_in_maildir(
    settings: Settings, read_mail: Callable[[], list[EmailMessage]], reset_services: None
) -> None:
    assert settings.smtp_security == "none"
    _send(settings, "Ihre Anfrage – Bestätigung")
    [message] = read_mail()
    assert message["Subject"] == "Ihre Anfrage – Bestätigung"
    assert message["To"] == "zoë@example.com"
    assert message.get_content().strip() == "Grüße"


def test_prefect_flow_runs_on_the_stack_server(stack: StackInfo) -> None:
    from prefect import flow
    from prefect.runtime import flow_run
    from prefect.settings import get_current_settings

    if stack.prefect_api_url is None:
        pytest.skip("the session stack has no prefect (--stack-services)")
    assert _get_json(f"{stack.prefect_api_url}/health") is True
    # The client is pointed at the stack (not at an ephemeral server that would share PREFECT_HOME's database
    # and make the run show up there too).
    assert get_current_settings().api.url == stack.prefect_api_url

    @flow(name="stack-smoke")
    def smoke() -> str:
        return str(flow_run.id)

    run_id = smoke()
    run = _get_json(f"{stack.prefect_api_url}/flow_runs/{run_id}")
    assert run["state"]["type"] == "COMPLETED"


def test_settings_come_from_the_stack(settings: Settings, stack: StackInfo) -> None:
    assert settings.database_url.get_secret_value().startswith("postgresql+psycopg://postgres:")
    assert settings.s3_endpoint_url == stack.services["s3"].url
    assert settings.stripe_api_base == stack.services["stripe"].url
    assert (settings.smtp_host, settings.smtp_port) == ("127.0.0.1", stack.services["smtp"].port)
    key_file = stack.home / "secret_key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert stack_file().stat().st_mode & 0o777 == 0o600  # holds the database password
    assert settings.secret_key.get_secret_value() == key_file.read_text().strip()
    assert len(settings.secret_key.get_secret_value()) >= 32
    assert set(read_stack_values()) <= set(Settings.model_fields)


def test_session_stack_is_up_and_up_again_is_a_no_op(stack: StackInfo) -> None:
    states = {row.name: row.state for row in stack_status() if row.state != "off"}
    assert states == {name: "up" for name in stack.services}
    # os.environ now holds the stack's own addresses (exported by the fixture): they must not count as external.
    again = start_stack(list(stack.services))
    assert again.started == {}
    assert {n: s.pid for n, s in again.services.items()} == {n: s.pid for n, s in stack.services.items()}


# --- separate stacks -----------------------------------------------------------------------------------------


def test_down_leaves_no_process_and_no_port(other_home: Path) -> None:
    info = start_stack(SMALL, environ={})
    assert set(info.started) == set(SMALL)
    pids = {name: svc.pid for name, svc in info.services.items()}
    ports = {name: svc.port for name, svc in info.services.items()}
    assert all(_port_listening(port) for port in ports.values() if port)
    # (load_settings() would answer with the session stack: the fixture exported its settings to os.environ)
    assert read_stack_values()["database_url"].endswith(f":{ports['postgres']}/cellcms")

    # A crashed service is reported down and `up` restarts just that one.
    assert pids["smtp"] is not None
    os.kill(pids["smtp"], signal.SIGKILL)
    psutil.Process(pids["smtp"]).wait(5)
    assert {row.name: row.state for row in stack_status()}["smtp"] == "down"
    restarted = start_stack(SMALL, environ={})
    assert set(restarted.started) == {"smtp"}
    pids["smtp"] = restarted.services["smtp"].pid
    ports["smtp"] = restarted.services["smtp"].port

    assert stop_stack() == SMALL
    for name, pid in pids.items():
        assert pid is not None
        assert _group_alive(pid) == [], f"{name} left processes"
        assert not _port_listening(ports[name] or 0), f"{name} still listens"
    assert read_stack() is None
    assert not stack_file().exists()
    assert (other_home / "postgres" / "PG_VERSION").exists()  # data kept
    assert {row.state for row in stack_status()} == {"off"}

    stop_stack(wipe=True)
    assert not other_home.exists()


def test_external_setting_is_not_started(other_home: Path) -> None:
    info = start_stack(["s3", "smtp"], environ={"CELLCMS_S3_ENDPOINT_URL": "http://s3.example.invalid:9000"})
    assert list(info.started) == ["smtp"]
    assert info.services["s3"].external
    assert "s3_endpoint_url" not in info.settings  # the environment's value wins
    assert not (other_home / "run" / "s3.json").exists()
    states = {row.name: row.state for row in stack_status()}
    assert states == {"postgres": "off", "s3": "external", "stripe": "off", "smtp": "up", "prefect": "off"}


def test_failed_start_names_the_service_and_its_log(other_home: Path) -> None:
    # A data dir from an unknown PostgreSQL version: the server refuses to start.
    (other_home / "postgres").mkdir(parents=True)
    (other_home / "postgres" / "PG_VERSION").write_text("99\n")
    (other_home / "postgres.password").write_text("pw\n")
    with pytest.raises(stack_module.StackError) as caught:
        start_stack(["postgres", "smtp"], environ={})
    message = str(caught.value)
    assert re.match(r"postgres exited with code \d+ while starting: see ", message)
    assert str(other_home / "logs" / "postgres.log") in message
    assert "\n" not in message
    # What did start (smtp) was stopped again, and nothing was published.
    assert not stack_file().exists()
    assert list((other_home / "run").iterdir()) == []


def test_short_secret_key_is_refused(other_home: Path) -> None:
    other_home.mkdir(parents=True)
    (other_home / "secret_key").write_text("too short\n")
    with pytest.raises(stack_module.StackError, match="secret_key holds a key shorter than 32"):
        start_stack(["smtp"], environ={})


# --- the CLI -------------------------------------------------------------------------------------------------


def _cli(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    # Without the session stack's exported settings, which would make every service "external".
    exported = {variable for variable, _ in ENVIRONMENT.values()} | {"PREFECT_API_URL"}
    env = {k: v for k, v in os.environ.items() if k not in exported}
    env["PRIVACY_OPS_HOME"] = str(home)
    return subprocess.run(
        [sys.executable, "-m", "privacy_ops.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=PROJECT_ROOT,
        timeout=120,
    )


def test_cli_up_status_down(other_home: Path) -> None:
    up = _cli("stack", "up", "-s", "smtp", "-s", "stripe", home=other_home)
    assert up.returncode == 0, up.stderr
    assert up.stdout.splitlines()[0] == "starting stripe, smtp ..."
    assert "ready in" in up.stdout
    again = _cli("stack", "up", "-s", "smtp", home=other_home)
    assert "nothing to start: already running" in again.stdout

    status = _cli("stack", "status", home=other_home)
    lines = {line.split()[0]: line.split()[1] for line in status.stdout.splitlines() if line.strip()}
    assert (lines["smtp"], lines["stripe"], lines["postgres"]) == ("up", "up", "off")

    # No Prefect in this stack: `stack env` fails with one line on stderr, no traceback.
    env = _cli("stack", "env", home=other_home)
    assert env.returncode == 1
    assert env.stderr.strip().startswith("error: no Prefect server")
    assert len(env.stderr.strip().splitlines()) == 1

    down = _cli("stack", "down", home=other_home)
    assert down.returncode == 0, down.stderr
    assert "stopped stripe, smtp" in down.stdout
    assert "no local stack running" in _cli("stack", "status", home=other_home).stdout


def test_cli_unknown_service_is_one_line(other_home: Path) -> None:
    result = _cli("stack", "up", "-s", "mysql", home=other_home)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "error: unknown service mysql (choose from postgres, s3, stripe, smtp, prefect)"
    )
    assert result.stdout == ""


def test_cli_help(tmp_path: Path) -> None:
    result = _cli("stack", "--help", home=tmp_path)
    assert result.returncode == 0
    for command in ("up", "down", "status", "env"):
        assert command in result.stdout

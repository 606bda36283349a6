"""Shared fixtures: one real local stack (PostgreSQL, S3, Stripe, SMTP, Prefect) per test session.

Importing this file, before any test module imports prefect, points PRIVACY_OPS_HOME and PREFECT_HOME at a fresh
temp dir, so tests never touch the developer's stack (.privacy-ops/), and removes connection settings inherited
from the shell (CELLCMS_DATABASE_URL, PREFECT_API_URL, ...) so tests never write to a configured, possibly real,
server. Set PRIVACY_OPS_TESTS_USE_ENVIRONMENT=1 to keep them: the stack then uses those as external services.

`stack` starts the services on first use (~12-30 s, Prefect is the slow one), exports their settings into
os.environ (CELLCMS_DATABASE_URL, ...) and points Prefect at the stack's server. Prefect reads its settings when it
is imported, which has already happened by then (test modules import flows), so setting PREFECT_API_URL in
os.environ alone is not enough: the fixture also enters `prefect.settings.temporary_settings`. The env var is set
too, for subprocesses. `pytest --stack-services=postgres,s3` starts only some services.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from privacy_ops.settings import ENVIRONMENT, HOME_VARIABLE, ConfigError, Settings, load_settings

if TYPE_CHECKING:
    import stripe
    from mypy_boto3_s3 import S3Client
    from sqlalchemy.engine import Engine

    from privacy_ops.stack import StackInfo

_HOME = Path(tempfile.mkdtemp(prefix="privacy-ops-test-"))
_KEPT = _HOME.with_name(_HOME.name + "-failed")  # logs and mail of a session with failures
os.environ[HOME_VARIABLE] = str(_HOME)
os.environ["PREFECT_HOME"] = str(_HOME / "prefect")  # = stack.prefect_home() for this PRIVACY_OPS_HOME
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
if os.environ.get("PRIVACY_OPS_TESTS_USE_ENVIRONMENT") != "1":
    for _variable in [*(v for v, _ in ENVIRONMENT.values()), "PREFECT_API_URL", "PREFECT_API_KEY"]:
        os.environ.pop(_variable, None)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--stack-services",
        default=None,
        help="comma-separated services for the session stack (default: postgres,s3,stripe,smtp,prefect)",
    )


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Browser tests last (pytest groups them early by their parametrized session fixtures): Playwright's sync API
    leaves an event loop running in the main thread for the rest of the session, and Prefect's sync-compatible
    calls made there afterwards (resume_flow_run, ...) would return coroutines that never run."""
    items.sort(key=lambda item: "browser_name" in getattr(item, "fixturenames", ()))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _KEPT.exists():
        terminalreporter.write_line(f"local stack logs and mail of this failed run: {_KEPT}")


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_HOME, ignore_errors=True)  # when no stack ran, PREFECT_HOME may have left files here


@contextlib.contextmanager
def _prefect_pointed_at(api_url: str | None) -> Iterator[None]:
    """Make this process's Prefect client use the stack's server; drain its log/event queues before leaving."""
    if api_url is None:
        yield
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        try:
            yield
        finally:
            # Flush queued logs and events while the server still runs, else they fail noisily at exit.
            APILogWorker.drain_all(timeout=10)
            EventsWorker.drain_all(timeout=10)


def _keep_for_debugging() -> None:
    """Copy what helps debugging (server logs, sent mail) to _KEPT; not the ~50 MB of databases."""
    for entry in ("logs", "maildir"):
        if (_HOME / entry).exists():
            shutil.copytree(_HOME / entry, _KEPT / entry, dirs_exist_ok=True)


@pytest.fixture(scope="session")
def stack(request: pytest.FixtureRequest) -> Iterator[StackInfo]:
    """The session's running stack (StackInfo: services, settings, prefect_api_url); stopped at session end."""
    from privacy_ops.stack import prefect_env, settings_env, start_stack, stop_stack

    option = request.config.getoption("--stack-services")
    services = option.split(",") if option else None
    try:
        info = start_stack(services)
    except BaseException:
        stop_stack()  # a failed or interrupted start may leave some servers running
        _keep_for_debugging()  # the error names a log file under _HOME, which is removed at exit
        raise
    exported = settings_env(info) | (prefect_env(info) if info.prefect_api_url else {})
    saved = {name: os.environ.get(name) for name in exported}
    os.environ.update(exported)
    try:
        with _prefect_pointed_at(info.prefect_api_url):
            yield info
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        stop_stack()
        if request.session.testsfailed:
            _keep_for_debugging()
        stop_stack(wipe=True)
        shutil.rmtree(_HOME, ignore_errors=True)


def _service(stack: StackInfo, name: str) -> None:
    """Skip the test when the session stack runs without this service (`--stack-services`)."""
    if name not in stack.services:
        pytest.skip(f"the session stack has no {name} (--stack-services)")


def _setting(stack: StackInfo, name: str) -> Any:
    """One setting as load_settings() resolves it (environment first), without needing the others."""
    value = os.environ.get(ENVIRONMENT[name][0]) or stack.settings.get(name)
    return value if value not in (None, "") else Settings.model_fields[name].default


@pytest.fixture
def settings(stack: StackInfo) -> Settings:
    """Settings resolved as the flows resolve them (environment, then stack.json); needs the full stack."""
    try:
        return load_settings()
    except ConfigError as error:
        pytest.skip(f"incomplete settings with this --stack-services: {error}")


@pytest.fixture(scope="session")
def engine(stack: StackInfo) -> Iterator[Engine]:
    """SQLAlchemy engine on the stack's `cellcms` database (superuser: tests may create their own databases)."""
    from sqlalchemy import create_engine

    _service(stack, "postgres")
    engine = create_engine(_setting(stack, "database_url"), pool_pre_ping=True)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def s3(stack: StackInfo) -> S3Client:
    """boto3 S3 client on the stack's S3 endpoint."""
    import boto3
    from botocore.config import Config

    _service(stack, "s3")
    return boto3.client(
        "s3",
        endpoint_url=_setting(stack, "s3_endpoint_url"),
        region_name=_setting(stack, "s3_region"),
        aws_access_key_id=_setting(stack, "s3_access_key_id"),
        aws_secret_access_key=_setting(stack, "s3_secret_access_key"),
        config=Config(s3={"addressing_style": "path"}),  # bucket names need not resolve in DNS
    )


@pytest.fixture(scope="session")
def stripe_client(stack: StackInfo) -> stripe.StripeClient:
    """stripe.StripeClient talking to the stack's Stripe (localstripe)."""
    import stripe

    _service(stack, "stripe")
    key, base = _setting(stack, "stripe_api_key"), _setting(stack, "stripe_api_base")
    if base:
        return stripe.StripeClient(key, base_addresses={"api": base})
    return stripe.StripeClient(key)


@pytest.fixture
def maildir(stack: StackInfo) -> Path:
    """Maildir of the stack's SMTP sink: every message sent to it lands here."""
    from privacy_ops.stack import maildir_path

    _service(stack, "smtp")
    if stack.services["smtp"].external:
        pytest.skip("SMTP is external: its messages are not in our maildir")

    return maildir_path()


@pytest.fixture
def read_mail(maildir: Path) -> Callable[[], list[EmailMessage]]:
    """Call it to get every message the SMTP sink received so far (EmailMessage objects, in arrival order)."""
    from privacy_ops.stack import read_mail as read

    return lambda: read(maildir)


@pytest.fixture
def reset_services(stack: StackInfo) -> None:
    """Empty the stack's S3, Stripe and maildir before the test (not PostgreSQL, never an external service)."""
    from privacy_ops.stack import reset_service_data

    reset_service_data(stack)


SEEDED_ACCOUNTS = 40  # accounts 1..10 carry every hard case; 21..24 the retention cases (cellcms_sandbox)


@pytest.fixture(scope="module")
def cellcms(stack: StackInfo, s3: S3Client, stripe_client: stripe.StripeClient) -> Iterator[Settings]:
    """A freshly seeded sandbox CellCMS for one test module: 40 accounts, all with S3 files and (when paying)
    Stripe billing; the privacy_ops schema exists. Returns the settings the flows resolve."""
    from cellcms_sandbox.database import migrate
    from cellcms_sandbox.generator import seed_sandbox
    from privacy_ops.services import reset_cache, services

    settings = load_settings()
    url = settings.database_url.get_secret_value()
    migrate(url)
    seed_sandbox(
        url,
        s3,
        stripe_client,
        settings.content_bucket,
        SEEDED_ACCOUNTS,
        reset=True,
        progress=False,
        s3_accounts=SEEDED_ACCOUNTS,
        stripe_accounts=SEEDED_ACCOUNTS,
    )
    reset_cache()
    services()  # creates the privacy_ops schema before any test polls it
    yield settings
    reset_cache()


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll `predicate` every second until it returns something truthy (returned), or fail naming `what`."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")

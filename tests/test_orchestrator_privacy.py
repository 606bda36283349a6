"""After the request flows ran (tests/test_flows.py runs first), Prefect's own database holds no personal data.

Prefect stores flow-run parameters, log lines, state messages, artifacts and events. The one place personal data
may enter is the intake parameter a person types (flow_run.parameters); everything else is scanned for every
seeded person's email and name. The seeded people are regenerated from the generator's seed in a scratch
database, so the scan also covers people the flows have since erased.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text

from cellcms_sandbox.database import migrate
from cellcms_sandbox.generator import seed_sandbox
from tests.conftest import SEEDED_ACCOUNTS

ALLOWED = {("flow_run", "parameters")}  # the intake form, typed by a person


@pytest.fixture(scope="module")
def seeded_people(engine: Engine) -> Iterator[list[str]]:
    """Emails and names of every person the flow tests seeded, regenerated deterministically."""
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("DROP DATABASE IF EXISTS people_reference WITH (FORCE)"))
        connection.execute(text("CREATE DATABASE people_reference"))
    url = engine.url.set(database="people_reference").render_as_string(hide_password=False)
    migrate(url)
    seed_sandbox(url, None, None, "unused", SEEDED_ACCOUNTS, progress=False)
    reference = create_engine(url)
    with reference.connect() as connection:
        values = [v for row in connection.execute(text("SELECT email, full_name FROM accounts")) for v in row]
    reference.dispose()
    yield values
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("DROP DATABASE IF EXISTS people_reference WITH (FORCE)"))


def _prefect_rows(database: sqlite3.Connection) -> Iterator[tuple[str, str, str]]:
    """(table, column, value) of every text value in Prefect's database."""
    tables = [r[0] for r in database.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    for table in tables:
        columns = [r[1] for r in database.execute(f'PRAGMA table_info("{table}")')]
        for column in columns:
            if (table, column) in ALLOWED:
                continue
            for (value,) in database.execute(f'SELECT "{column}" FROM "{table}" WHERE "{column}" IS NOT NULL'):
                if isinstance(value, bytes):
                    value = value.decode("utf-8", "replace")
                yield table, column, str(value)


def test_prefect_holds_no_seeded_email_or_name_outside_intake(stack: Any, seeded_people: list[str]) -> None:
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    from privacy_ops.stack import prefect_home

    APILogWorker.drain_all(timeout=15)
    EventsWorker.drain_all(timeout=15)
    path = prefect_home() / "prefect.db"
    assert path.exists(), "the stack's Prefect server keeps its database here"
    pattern = re.compile(
        "|".join(re.escape(v) for v in sorted(seeded_people, key=len, reverse=True)), re.IGNORECASE
    )
    database = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        scanned = 0
        leaks = []
        for table, column, value in _prefect_rows(database):
            scanned += 1
            if pattern.search(value):
                leaks.append(f"{table}.{column}")
        flow_runs = database.execute("SELECT count(*) FROM flow_run").fetchone()[0]
        logs = database.execute("SELECT count(*) FROM log").fetchone()[0]
    finally:
        database.close()
    assert flow_runs >= 5 and logs > 0, "run after tests/test_flows.py: there must be request runs to scan"
    assert sorted(set(leaks)) == [], f"personal data in Prefect's database ({scanned} values scanned)"

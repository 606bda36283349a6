"""The hash-chained audit log against a real PostgreSQL: appends, tamper detection, idempotency, concurrency."""

from __future__ import annotations

import itertools
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

from privacy_ops.lifecycle import audit
from privacy_ops.lifecycle.schema import ensure_schema

# ---------------------------------------------------------------------------------------------------------------
# Fixtures: the session stack's PostgreSQL (conftest `engine`), with a fresh database for this module so that the
# audit chain starts empty and other tests' lifecycle rows are never touched.
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def db(engine: Engine) -> Iterator[Engine]:
    admin = engine.execution_options(isolation_level="AUTOCOMMIT")  # CREATE DATABASE cannot run in a transaction
    name = f"test_audit_{uuid.uuid4().hex[:8]}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    # Commits need not survive a crash of a test server: skipping the fsync makes 50 one-entry commits ~10x faster.
    fresh = create_engine(engine.url.set(database=name), connect_args={"options": "-c synchronous_commit=off"})
    with fresh.begin() as connection:
        ensure_schema(connection)
    yield fresh
    fresh.dispose()
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))


@pytest.fixture(autouse=True)
def empty_log(db: Engine) -> None:
    with db.begin() as connection:
        connection.execute(text("TRUNCATE privacy_ops.audit_log, privacy_ops.audit_head"))


def _append(engine: Engine, index: int, **overrides: Any) -> audit.AuditEntry | None:
    arguments: dict[str, Any] = {
        "step": "erase",
        "outcome": "done",
        "request_id": f"req_{index % 5:04d}",
        "subject_hash": f"{index:064x}",
        "details": {"index": index, "stores": {"cellcms": index * 2, "stripe": 1}, "ratio": 0.25},
        "idempotency_key": None,
    }
    arguments.update(overrides)
    with engine.begin() as connection:
        return audit.record(connection, **arguments)


@pytest.fixture
def chain50(db: Engine) -> Engine:
    for index in range(1, 51):
        _append(db, index)
    return db


def _verify(engine: Engine) -> audit.AuditVerification:
    with engine.connect() as connection:
        return audit.verify(connection)


def _sql(engine: Engine, statement: str) -> None:
    with engine.begin() as connection:
        connection.execute(text(statement))


# ---------------------------------------------------------------------------------------------------------------
# Chain and tamper detection
# ---------------------------------------------------------------------------------------------------------------


def test_chain_of_50_entries_verifies(chain50: Engine) -> None:
    result = _verify(chain50)
    assert result == audit.AuditVerification(ok=True, entries=50, problems=[])
    with chain50.connect() as connection:
        rows = connection.execute(
            text("SELECT seq, prev_hash, entry_hash FROM privacy_ops.audit_log ORDER BY seq")
        )
        chain = list(rows)
        head = connection.execute(text("SELECT seq, entry_hash FROM privacy_ops.audit_head")).one()
    assert [row.seq for row in chain] == list(range(1, 51))
    assert chain[0].prev_hash == "0" * 64
    assert all(later.prev_hash == earlier.entry_hash for earlier, later in itertools.pairwise(chain))
    assert (head.seq, head.entry_hash) == (50, chain[-1].entry_hash)


def test_altered_details_of_entry_10_reported(chain50: Engine) -> None:
    _sql(chain50, """UPDATE privacy_ops.audit_log SET details = details || '{"index": 999}' WHERE seq = 10""")
    result = _verify(chain50)
    assert not result.ok
    assert result.problems == ["entry 10: hash mismatch (altered)"]


@pytest.mark.parametrize(
    "assignment",
    [
        "recorded_at = recorded_at + interval '1 second'",
        "request_id = 'req_other'",
        "request_id = NULL",
        "step = 'export'",
        "outcome = 'failed'",
        "subject_hash = NULL",
        "idempotency_key = 'forged'",
        """details = '{"index": 10}'""",
        "prev_hash = repeat('f', 64)",
    ],
)
def test_any_altered_column_reported(chain50: Engine, assignment: str) -> None:
    _sql(chain50, f"UPDATE privacy_ops.audit_log SET {assignment} WHERE seq = 10")
    result = _verify(chain50)
    assert "entry 10: hash mismatch (altered)" in result.problems


def test_recomputed_hash_of_altered_entry_breaks_the_next_link(chain50: Engine) -> None:
    # A tamperer who also fixes entry 10's own hash is caught at entry 11 (and at the head, were it the last).
    _sql(chain50, "UPDATE privacy_ops.audit_log SET entry_hash = repeat('a', 64) WHERE seq = 10")
    problems = _verify(chain50).problems
    assert "entry 10: hash mismatch (altered)" in problems
    assert any(problem.startswith("entry 11: does not follow entry 10") for problem in problems)


def test_deleted_entry_20_reported(chain50: Engine) -> None:
    _sql(chain50, "DELETE FROM privacy_ops.audit_log WHERE seq = 20")
    result = _verify(chain50)
    assert (result.ok, result.entries) == (False, 49)
    assert result.problems == ["entry 20 missing (deleted)"]


def test_deleted_range_reported(chain50: Engine) -> None:
    _sql(chain50, "DELETE FROM privacy_ops.audit_log WHERE seq IN (18, 19)")
    assert _verify(chain50).problems == ["entries 18-19 missing (deleted)"]


def test_deleted_first_entry_reported(chain50: Engine) -> None:
    _sql(chain50, "DELETE FROM privacy_ops.audit_log WHERE seq = 1")
    assert _verify(chain50).problems == ["entry 1 missing (deleted)"]


def test_deleted_tail_reported(chain50: Engine) -> None:
    _sql(chain50, "DELETE FROM privacy_ops.audit_log WHERE seq > 48")  # the head still says 50
    result = _verify(chain50)
    assert result.problems == ["head says seq 50 but last entry is 48 (tail deleted)"]


def test_deleted_everything_but_head_reported(chain50: Engine) -> None:
    _sql(chain50, "DELETE FROM privacy_ops.audit_log")
    assert _verify(chain50).problems == ["head says seq 50 but the log is empty (all entries deleted)"]


def test_reordered_entries_reported(chain50: Engine) -> None:
    # Swap entries 5 and 6 (through a temporary seq: seq is the primary key).
    _sql(chain50, "UPDATE privacy_ops.audit_log SET seq = -1 WHERE seq = 5")
    _sql(chain50, "UPDATE privacy_ops.audit_log SET seq = 5 WHERE seq = 6")
    _sql(chain50, "UPDATE privacy_ops.audit_log SET seq = 6 WHERE seq = -1")
    problems = _verify(chain50).problems
    assert "entry 5: hash mismatch (altered)" in problems
    assert "entry 6: hash mismatch (altered)" in problems
    assert any(problem.startswith("entry 5: does not follow entry 4") for problem in problems)


def test_altered_head_reported(chain50: Engine) -> None:
    _sql(chain50, "UPDATE privacy_ops.audit_head SET entry_hash = repeat('b', 64)")
    assert _verify(chain50).problems == ["head hash does not match entry 50 (head or entry altered)"]


def test_deleted_head_reported_and_blocks_appends(chain50: Engine) -> None:
    _sql(chain50, "DELETE FROM privacy_ops.audit_head")
    assert _verify(chain50).problems == ["audit_head is missing but the log has 50 entries (head deleted)"]
    with pytest.raises(audit.AuditError, match="audit_head is missing"):
        _append(chain50, 51)


def test_verify_is_independent_of_the_session_time_zone(chain50: Engine) -> None:
    with chain50.connect() as connection:
        connection.execute(text("SET TIME ZONE 'America/Los_Angeles'"))
        assert audit.verify(connection).ok


def test_empty_log_verifies(db: Engine) -> None:
    assert _verify(db) == audit.AuditVerification(ok=True, entries=0, problems=[])


# ---------------------------------------------------------------------------------------------------------------
# Appending
# ---------------------------------------------------------------------------------------------------------------


def test_idempotency_key_recorded_once(db: Engine) -> None:
    first = _append(db, 1, idempotency_key="req_0001:erase:cellcms")
    second = _append(db, 1, idempotency_key="req_0001:erase:cellcms")
    assert first is not None and first.seq == 1
    assert second is None
    result = _verify(db)
    assert (result.ok, result.entries) == (True, 1)


def test_entry_rolls_back_with_the_callers_transaction(chain50: Engine) -> None:
    with chain50.connect() as connection:
        entry = audit.record(
            connection, step="erase", outcome="done", request_id="req_x", subject_hash=None, details={}
        )
        assert entry is not None and entry.seq == 51
        connection.rollback()  # e.g. the erasure it describes failed
    result = _verify(chain50)
    assert (result.ok, result.entries) == (True, 50)
    assert _append(chain50, 51) is not None  # and the chain goes on from 50


def test_concurrent_appends_stay_contiguous(db: Engine) -> None:
    threads, per_thread = 4, 25
    start = threading.Barrier(threads)
    errors: list[BaseException] = []

    def worker(number: int) -> None:
        try:
            start.wait()
            for index in range(per_thread):
                _append(db, number * 1000 + index, request_id=f"req_thread{number}")
        except BaseException as error:  # surfaced below: an assertion in a thread would be lost
            errors.append(error)

    workers = [threading.Thread(target=worker, args=(number,)) for number in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    assert errors == []
    result = _verify(db)
    assert (result.ok, result.entries) == (True, threads * per_thread)
    with db.connect() as connection:
        seqs = connection.execute(text("SELECT seq FROM privacy_ops.audit_log ORDER BY seq")).scalars().all()
    assert seqs == list(range(1, threads * per_thread + 1))


def test_entries_for_request(chain50: Engine) -> None:
    with chain50.connect() as connection:
        entries = audit.entries_for_request(connection, "req_0003")
    assert [entry.seq for entry in entries] == [3, 8, 13, 18, 23, 28, 33, 38, 43, 48]
    assert all(entry.expected_hash() == entry.entry_hash for entry in entries)


def test_returned_entry_matches_stored_row(db: Engine) -> None:
    # jsonb normalises numbers (1e20 becomes 100000000000000000000): the hash must cover the stored form.
    entry = _append(db, 1, details={"big": 1e20, "small": 1.5e-7, "nested": [{"a": None}, True]})
    assert entry is not None
    with db.connect() as connection:
        (stored,) = audit.entries_for_request(connection, entry.request_id or "")
    assert stored == entry
    assert _verify(db).ok


# ---------------------------------------------------------------------------------------------------------------
# Personal-data guard
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("details", "where", "kind"),
    [
        ({"note": "mail sent to alice@example.com"}, "details.note", "an email address"),
        ({"stores": [{"ok": 1}, {"who": "Bob.Smith+x@mail.example.org"}]}, "details.stores[1].who", "an email"),
        ({"last_login_ip": "203.0.113.7"}, "details.last_login_ip", "an IP address"),
        ({"referrer": "from 10.0.0.9/32"}, "details.referrer", "an IP address"),
        ({"ip": "2001:db8::1"}, "details.ip", "an IP address"),
        ({"ip": "fe80::1%eth0"}, "details.ip", "an IP address"),
    ],
)
def test_details_with_personal_data_rejected(db: Engine, details: dict[str, Any], where: str, kind: str) -> None:
    with pytest.raises(ValueError) as raised:
        _append(db, 1, details=details)
    message = str(raised.value)
    assert where in message and kind in message
    for value in ("alice@", "Bob.Smith", "203.0.113.7", "10.0.0.9", "2001:db8", "fe80"):
        assert value not in message  # the key is named, never the value
    assert _verify(db).entries == 0


def test_key_with_personal_data_rejected(db: Engine) -> None:
    with pytest.raises(ValueError, match="has a key that looks like personal data") as raised:
        _append(db, 1, details={"per_subject": {"carol@example.com": 3}})
    assert "carol" not in str(raised.value)


@pytest.mark.parametrize(
    "value",
    [
        "2026-11-29T14:40:00+00:00",
        "14:40:00",
        "great-expectations 1.24.1",
        "exports/req_7f3a9c21b0/package.zip",
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "psn_0a1b2c3d4e5f60718293a4b5",
        "Foo::bar",
        "deleted 12 rows; kept 3 invoices (tax law, until 2033-12-31)",
    ],
)
def test_harmless_details_accepted(db: Engine, value: str) -> None:
    assert _append(db, 1, details={"value": value}) is not None


def test_non_json_details_rejected(db: Engine) -> None:
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        _append(db, 1, details={"when": object()})
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        _append(db, 1, details={"ratio": float("nan")})

"""The append-only, hash-chained audit log of every privacy request step.

Each entry carries `prev_hash` (the previous entry's `entry_hash`, "0"*64 for the first) and `entry_hash`, a
SHA-256 over a canonical JSON of all its other columns. `audit_head` holds the newest seq and hash. Together they
make tampering visible to `verify`: an altered entry no longer matches its hash, a deleted entry leaves a gap in
the contiguous seq, a deleted tail leaves the head pointing past the last entry, a reordered chain breaks links.

The hash is unkeyed: it proves the log was not changed *piecemeal*; someone able to rewrite the whole log and the
head can recompute every hash. Anchoring the head elsewhere (e.g. in the compliance summary mail) closes that gap.

Entries never hold personal data in clear: subjects are keyed hashes (`privacy_ops.pii.subject_hash`) and
`details` is checked for values that look like an email or IP address before anything is written.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection, Row

from privacy_ops.lifecycle.schema import SCHEMA

GENESIS_HASH = "0" * 64
HEAD_ID = 1
# One lock key for every appender, in every process: appends are serialised across workers.
_LOCK_SQL = text("SELECT pg_advisory_xact_lock(hashtext('privacy_ops.audit_log'))")
_COLUMNS = (
    "seq, recorded_at, request_id, step, outcome, subject_hash, details, idempotency_key, prev_hash, entry_hash"
)


class AuditError(Exception):
    """The audit log cannot be appended to safely (its head is gone while entries remain)."""


@dataclass(frozen=True)
class AuditEntry:
    """One audit log row, as written or read back."""

    seq: int
    recorded_at: datetime
    request_id: str | None
    step: str
    outcome: str
    subject_hash: str | None
    details: dict[str, Any]
    idempotency_key: str | None
    prev_hash: str
    entry_hash: str

    def expected_hash(self) -> str:
        """The hash this entry's columns should have; differs from `entry_hash` if any column was altered."""
        return entry_hash(
            seq=self.seq,
            recorded_at=self.recorded_at,
            request_id=self.request_id,
            step=self.step,
            outcome=self.outcome,
            subject_hash=self.subject_hash,
            details=self.details,
            idempotency_key=self.idempotency_key,
            prev_hash=self.prev_hash,
        )


@dataclass(frozen=True)
class AuditVerification:
    """The verdict of `verify`: ok when `problems` is empty."""

    ok: bool
    entries: int
    problems: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------
# Personal-data guard: a cheap safety net, not a classifier. Candidates are found by regex, IPs confirmed by
# `ipaddress` so that times ("14:40:00") and versions ("1.24.1") pass.
# ---------------------------------------------------------------------------------------------------------------

_EMAIL = re.compile(r"[\w.%+-]+@[\w-]+(?:\.[\w-]+)+")
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w]|\.\d)")
# Neighbours may not be word characters or colons, so "Foo::bar" and "T14:40:00" are not candidates.
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?:%\w+)?(?![\w:])")


def _personal_kind(value: str) -> str | None:
    """'an email address' / 'an IP address' if `value` contains one, else None."""
    if _EMAIL.search(value):
        return "an email address"
    for pattern in (_IPV4, _IPV6):
        for match in pattern.finditer(value):
            try:
                ipaddress.ip_address(match.group(0).split("%")[0])
            except ValueError:
                continue
            return "an IP address"
    return None


def check_no_personal_data(value: Any, path: str = "details") -> None:
    """Raise ValueError if any string in `value` (keys included) looks like an email or IP address.

    The message names where (e.g. `details.stores[2].note`), never the value: it may end up in logs and
    Prefect state messages, which must not carry personal data either.
    """
    if isinstance(value, str):
        kind = _personal_kind(value)
        if kind:
            raise ValueError(f"{path} looks like {kind}: audit details must not contain personal data")
    elif isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{path} has a non-string key: audit details must be a JSON object")
            if _personal_kind(key):
                raise ValueError(f"{path} has a key that looks like personal data: use a neutral key")
            check_no_personal_data(item, f"{path}.{key}")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            check_no_personal_data(item, f"{path}[{index}]")


# ---------------------------------------------------------------------------------------------------------------
# Hashing
# ---------------------------------------------------------------------------------------------------------------


def _canonical_time(moment: datetime) -> str:
    # Normalised to UTC: psycopg returns timestamptz in the session's time zone, which must not change the hash.
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def entry_hash(
    *,
    seq: int,
    recorded_at: datetime,
    request_id: str | None,
    step: str,
    outcome: str,
    subject_hash: str | None,
    details: Mapping[str, Any],
    idempotency_key: str | None,
    prev_hash: str,
) -> str:
    """SHA-256 hex of the canonical JSON (sorted keys, no whitespace) of every column but entry_hash itself.

    idempotency_key is included too, so that no column can be altered unnoticed.
    """
    document = {
        "seq": seq,
        "recorded_at": _canonical_time(recorded_at),
        "request_id": request_id,
        "step": step,
        "outcome": outcome,
        "subject_hash": subject_hash,
        "details": details,
        "idempotency_key": idempotency_key,
        "prev_hash": prev_hash,
    }
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Append
# ---------------------------------------------------------------------------------------------------------------


def record(
    connection: Connection,
    *,
    step: str,
    outcome: str,
    request_id: str | None,
    subject_hash: str | None,
    details: dict[str, Any],
    idempotency_key: str | None = None,
) -> AuditEntry | None:
    """Append one entry inside the caller's transaction; the caller commits (or rolls back) it with its own work.

    Appenders are serialised by a transaction-level advisory lock, so seq stays contiguous across workers; the lock
    is held until the caller's transaction ends, so keep transactions that audit short. Use READ COMMITTED (the
    default): under REPEATABLE READ a concurrent append makes this call fail (serialisation error or duplicate
    seq) rather than fork the chain.

    Returns the new entry, or None (writing nothing) when `idempotency_key` was already recorded: a rerun of a flow
    records a finished step once. Raises ValueError when `details` is not JSON-able or looks like it holds personal
    data, AuditError when the head row is missing while entries exist (tampering: run `verify`).
    """
    if not isinstance(details, dict):
        raise ValueError("details must be a dict (a JSON object)")
    check_no_personal_data(details)
    check_no_personal_data(step, "step")
    check_no_personal_data(outcome, "outcome")
    try:
        details_json = json.dumps(details, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as error:
        # The message names a type ("Object of type datetime ..."), never a value.
        raise ValueError(f"details is not JSON-serialisable: {error}") from None

    connection.execute(_LOCK_SQL)

    if idempotency_key is not None:
        existing = connection.execute(
            text(f"SELECT 1 FROM {SCHEMA}.audit_log WHERE idempotency_key = :key"), {"key": idempotency_key}
        ).first()
        if existing is not None:
            return None

    head = connection.execute(
        text(f"SELECT seq, entry_hash FROM {SCHEMA}.audit_head WHERE id = :id FOR UPDATE"), {"id": HEAD_ID}
    ).first()
    if head is None:
        last = connection.execute(text(f"SELECT max(seq) FROM {SCHEMA}.audit_log")).scalar()
        if last is not None:
            # Recreating the head here would hide a deleted tail for good: fail loudly instead.
            raise AuditError(f"audit_head is missing but audit_log has entries up to seq {last}: run verify")
        prev_seq, prev_hash = 0, GENESIS_HASH
    else:
        prev_seq, prev_hash = int(head.seq), str(head.entry_hash)

    # clock_timestamp() (not now()) after taking the lock: one clock for all workers and ordered like seq.
    # The details go through PostgreSQL's jsonb once before hashing, so the hash covers exactly what verify will
    # read back (jsonb rewrites e.g. 1e20 as 100000000000000000000).
    stamp = connection.execute(
        text("SELECT clock_timestamp() AS recorded_at, CAST(:details AS jsonb) AS details"),
        {"details": details_json},
    ).one()
    recorded_at: datetime = stamp.recorded_at
    stored_details: dict[str, Any] = stamp.details

    seq = prev_seq + 1
    digest = entry_hash(
        seq=seq,
        recorded_at=recorded_at,
        request_id=request_id,
        step=step,
        outcome=outcome,
        subject_hash=subject_hash,
        details=stored_details,
        idempotency_key=idempotency_key,
        prev_hash=prev_hash,
    )
    entry = AuditEntry(
        seq=seq,
        recorded_at=recorded_at,
        request_id=request_id,
        step=step,
        outcome=outcome,
        subject_hash=subject_hash,
        details=stored_details,
        idempotency_key=idempotency_key,
        prev_hash=prev_hash,
        entry_hash=digest,
    )
    connection.execute(
        text(
            f"INSERT INTO {SCHEMA}.audit_log ({_COLUMNS}) VALUES (:seq, :recorded_at, :request_id, :step, "
            ":outcome, :subject_hash, CAST(:details AS jsonb), :idempotency_key, :prev_hash, :entry_hash)"
        ),
        {**asdict(entry), "details": details_json},  # the exact JSON text the hash was computed over
    )
    connection.execute(
        text(
            f"INSERT INTO {SCHEMA}.audit_head (id, seq, entry_hash) VALUES (:id, :seq, :hash) "
            "ON CONFLICT (id) DO UPDATE SET seq = EXCLUDED.seq, entry_hash = EXCLUDED.entry_hash"
        ),
        {"id": HEAD_ID, "seq": seq, "hash": digest},
    )
    return entry


# ---------------------------------------------------------------------------------------------------------------
# Read and verify
# ---------------------------------------------------------------------------------------------------------------


def _entry(row: Row[Any]) -> AuditEntry:
    return AuditEntry(
        seq=int(row.seq),
        recorded_at=row.recorded_at,
        request_id=row.request_id,
        step=row.step,
        outcome=row.outcome,
        subject_hash=row.subject_hash,
        details=row.details,
        idempotency_key=row.idempotency_key,
        prev_hash=row.prev_hash,
        entry_hash=row.entry_hash,
    )


def entries_for_request(connection: Connection, request_id: str) -> list[AuditEntry]:
    """Every entry of one request, oldest first."""
    rows = connection.execute(
        text(f"SELECT {_COLUMNS} FROM {SCHEMA}.audit_log WHERE request_id = :request_id ORDER BY seq"),
        {"request_id": request_id},
    )
    return [_entry(row) for row in rows]


def _all_entries(connection: Connection, batch: int) -> Iterator[AuditEntry]:
    # Streamed with a server-side cursor: the log grows forever, verify must not load it into memory. The option
    # goes on the statement: Connection.execution_options() would change the caller's connection for good.
    result = connection.execute(
        text(f"SELECT {_COLUMNS} FROM {SCHEMA}.audit_log ORDER BY seq").execution_options(yield_per=batch)
    )
    for row in result:
        yield _entry(row)


def _missing(first: int, last: int) -> str:
    if first == last:
        return f"entry {first} missing (deleted)"
    return f"entries {first}-{last} missing (deleted)"


def verify(connection: Connection, *, max_problems: int = 100, batch: int = 5000) -> AuditVerification:
    """Check the whole chain and the head; report every problem found (up to `max_problems`).

    Needs no lock: the head is read first, the entries after, so under READ COMMITTED a concurrent append can only
    add entries beyond the head, which are checked as chain but do not count as a problem.
    """
    problems: list[str] = []
    head = connection.execute(
        text(f"SELECT seq, entry_hash FROM {SCHEMA}.audit_head WHERE id = :id"), {"id": HEAD_ID}
    ).first()

    count = 0
    previous: AuditEntry | None = None
    at_head: AuditEntry | None = None
    for entry in _all_entries(connection, batch):
        count += 1
        expected_seq = previous.seq + 1 if previous else 1
        if entry.seq > expected_seq:
            problems.append(_missing(expected_seq, entry.seq - 1))
        elif entry.seq == expected_seq:
            expected_prev = previous.entry_hash if previous else GENESIS_HASH
            if entry.prev_hash != expected_prev:
                after = f"entry {previous.seq}" if previous else "the start of the log"
                problems.append(f"entry {entry.seq}: does not follow {after} (chain broken: reordered/replaced)")
        else:  # only possible with seq <= 0, as seq is the primary key and rows come ordered
            problems.append(f"entry {entry.seq}: invalid seq")
        if entry.expected_hash() != entry.entry_hash:
            problems.append(f"entry {entry.seq}: hash mismatch (altered)")
        if head is not None and entry.seq == head.seq:
            at_head = entry
        previous = entry

    last_seq = previous.seq if previous else 0
    if head is None:
        if previous is not None:
            problems.append(f"audit_head is missing but the log has {count} entries (head deleted)")
    elif previous is None:
        if head.seq > 0:
            problems.append(f"head says seq {head.seq} but the log is empty (all entries deleted)")
    elif head.seq > last_seq:
        problems.append(f"head says seq {head.seq} but last entry is {last_seq} (tail deleted)")
    elif at_head is None:
        pass  # head.seq falls into a gap that is already reported above
    elif at_head.entry_hash != head.entry_hash:
        problems.append(f"head hash does not match entry {head.seq} (head or entry altered)")

    if len(problems) > max_problems:
        problems = [*problems[:max_problems], f"... and {len(problems) - max_problems} more problems"]
    return AuditVerification(ok=not problems, entries=count, problems=problems)

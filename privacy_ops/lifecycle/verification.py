"""Identity verification: a one-time code sent to the address on file, or an operator's recorded check.

The code is stored only as a keyed hash, expires (default 24 h) and allows at most 5 attempts; the sixth wrong
answer never happens because the fifth denies the request. Functions take a Connection: the caller owns the commit.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.engine import Connection

from privacy_ops.lifecycle.schema import verifications
from privacy_ops.pii import keyed_hash

MAX_ATTEMPTS = 5
CODE_LIFETIME = timedelta(hours=24)


class VerificationStatus(StrEnum):
    pending = "pending"
    verified = "verified"
    denied = "denied"  # too many wrong codes
    expired = "expired"


@dataclass(frozen=True)
class Verification:
    status: VerificationStatus
    attempts: int
    expires_at: datetime | None
    method: str

    @property
    def attempts_left(self) -> int:
        return max(0, MAX_ATTEMPTS - self.attempts)


def new_code() -> str:
    return f"{secrets.randbelow(1_000_000):06d}"


def _code_hash(secret_key: str, request_id: str, code: str) -> str:
    return keyed_hash(secret_key, f"{request_id}|{code.strip()}", "verification-code")


def issue_code(
    connection: Connection, *, secret_key: str, request_id: str, now: datetime, lifetime: timedelta = CODE_LIFETIME
) -> str:
    """Store the hash of a fresh code (replacing an unsent one) and return the code for the email only."""
    code = new_code()
    values = {
        "method": "email_code",
        "code_hash": _code_hash(secret_key, request_id, code),
        "expires_at": now + lifetime,
        "attempts": 0,
        "status": VerificationStatus.pending.value,
        "updated_at": now,
    }
    connection.execute(
        insert(verifications)
        .values(request_id=request_id, **values)
        .on_conflict_do_update(index_elements=[verifications.c.request_id], set_=values)
    )
    return code


def get_verification(connection: Connection, request_id: str) -> Verification | None:
    row = connection.execute(select(verifications).where(verifications.c.request_id == request_id)).first()
    if row is None:
        return None
    return Verification(VerificationStatus(row.status), row.attempts, row.expires_at, row.method)


def check_code(
    connection: Connection, *, secret_key: str, request_id: str, code: str, now: datetime
) -> Verification:
    """Count one attempt and return the resulting state; a settled verification is returned unchanged."""
    row = connection.execute(
        select(verifications).where(verifications.c.request_id == request_id).with_for_update()
    ).first()
    if row is None:
        raise LookupError(f"request {request_id} has no verification in progress")
    if row.status != VerificationStatus.pending.value:
        return Verification(VerificationStatus(row.status), row.attempts, row.expires_at, row.method)
    attempts = row.attempts + 1
    if row.expires_at is not None and now >= row.expires_at:
        status = VerificationStatus.expired
    elif hmac.compare_digest(row.code_hash or "", _code_hash(secret_key, request_id, code)):
        status = VerificationStatus.verified
    elif attempts >= MAX_ATTEMPTS:
        status = VerificationStatus.denied
    else:
        status = VerificationStatus.pending
    connection.execute(
        update(verifications)
        .where(verifications.c.request_id == request_id)
        .values(attempts=attempts, status=status.value, updated_at=now)
    )
    return Verification(status, attempts, row.expires_at, row.method)


def record_operator_verification(
    connection: Connection, *, request_id: str, verified_by: str, reason: str, now: datetime
) -> None:
    """Compliance ops verified the person by other means; the reason is mandatory and audited."""
    if not verified_by.strip() or not reason.strip():
        raise ValueError("--verified-by and a reason are both required")
    values = {
        "method": "operator",
        "code_hash": None,
        "status": VerificationStatus.verified.value,
        "verified_by": verified_by.strip(),
        "reason": reason.strip(),
        "updated_at": now,
    }
    connection.execute(
        insert(verifications)
        .values(request_id=request_id, attempts=0, **values)
        .on_conflict_do_update(index_elements=[verifications.c.request_id], set_=values)
    )


def expire(connection: Connection, *, request_id: str, now: datetime) -> None:
    """The code's lifetime ran out while the request waited: it can no longer be verified."""
    connection.execute(
        update(verifications)
        .where(
            verifications.c.request_id == request_id, verifications.c.status == VerificationStatus.pending.value
        )
        .values(status=VerificationStatus.expired.value, updated_at=now)
    )

"""Personal data that cannot leak by accident, and keyed hashes that stand in for it.

`Pii` wraps an identity value (email, name, ...): str(), repr(), f-strings, logging and pickling without the key
all print MASKED, so a Pii can be passed around, logged or raised in an exception without revealing anything. Code
that must use the value (a SQL parameter, an SMTP recipient) calls `.reveal()`, which is easy to grep for.
`keyed_hash` is the one keyed hash of the project: audit-log subject hashes, pseudonyms and per-request tokens.
Its SQL twin (`privacy_ops.stores.postgres.pseudonym_sql`) gives set-based updates the identical pseudonyms.
"""

from __future__ import annotations

import hashlib

MASK = "MASKED"
PSEUDONYM_PREFIX = "psn_"
PSEUDONYM_PURPOSE = "subject"
PSEUDONYM_LENGTH = 24


class Pii:
    """A personal value that masks itself everywhere except `.reveal()`."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __str__(self) -> str:
        return MASK

    def __repr__(self) -> str:
        return f"Pii({MASK})"

    def __format__(self, spec: str) -> str:
        return MASK

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pii) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> tuple[type, tuple[str]]:
        # Pickled only into encrypted result storage (privacy_ops.results); never into Prefect's database.
        return (Pii, (self._value,))


def keyed_hash(secret_key: str, value: str, purpose: str) -> str:
    """Hex SHA-256 of key|purpose|value: stable per key, meaningless without it."""
    return hashlib.sha256(f"{secret_key}|{purpose}|{value}".encode()).hexdigest()


def pseudonym(secret_key: str, account_id: int) -> str:
    """The stable pseudonym of an account, kept with retained records (e.g. invoices kept for tax law)."""
    return PSEUDONYM_PREFIX + keyed_hash(secret_key, str(account_id), PSEUDONYM_PURPOSE)[:PSEUDONYM_LENGTH]


def subject_hash(secret_key: str, identity: str) -> str:
    """How the audit log names a subject: a keyed hash of the identity given ("email:..." or "account:..."),
    never the identity in clear."""
    return keyed_hash(secret_key, identity.strip().lower(), "audit-subject")

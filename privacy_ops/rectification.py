"""Rectification (GDPR art. 16): what a correction request asks for, checked against the data map, and carrying it
out in PostgreSQL.

The new values are typed by an operator, like the intake email: `RectificationInput` is the flow's parameter
model (the Prefect UI renders it as a form, the server rejects a malformed new email before a run starts). From
there on they travel as `Pii` and reach PostgreSQL only as bound parameters; audit entries and the request outcome
carry field names, counts and keyed hashes, never a value.

The rules, all from the data map's `rectification:` section:
- a field listed under `fields` is corrected in its first column (the value of record) and, where they hold the
  same old value, in its other columns and its Stripe field: a billing name that is a company name is a different
  value, not a copy of the person's name, and stays;
- a field under `refused` is refused with the map's reason, an unknown field as unknown, a field the account does
  not hold (no billing profile) as not held; a field that already holds the value is left unchanged;
- a new email address must be well formed, belong to no other account and be confirmed with a code sent to it
  before it replaces the old one. The old address is then told of the change and redacted from free text
  (documents, tickets, logs): it survives only in the invoices the map refuses to correct (tax records).

The new address's code is a second verification of the same request, stored in `privacy_ops.verifications` under
`new_email_verification_id(request_id)`, so the code machinery (hash, expiry, 5 attempts) is the identity check's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy import Select, Text, any_, bindparam, func, select, union, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Connection

from privacy_ops.checks import SubjectIdentifiers, text_pattern
from privacy_ops.datamap.model import DataMap, Kind, RectifiableField
from privacy_ops.datamap.sql import primary_key_in, reach_select, table_clause
from privacy_ops.pii import Pii, keyed_hash
from privacy_ops.stores.postgres import REDACTED
from privacy_ops.stores.stripe_store import CUSTOMER_FIELDS

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from privacy_ops.lifecycle.verification import Verification

# The same pattern as the intake form's (flows/parameters.py): the server checks it before a run starts.
EMAIL_PATTERN = r"^[^@\s]+@[^@\s]+\.[^@\s]+$"
FIELD_PATTERN = r"^[a-z][a-z0-9_]{0,62}$"
# One line of text with at least one visible character: no control characters (newlines, NUL).
VALUE_PATTERN = r"^[^\x00-\x1f\x7f]*[^\s\x00-\x1f\x7f][^\x00-\x1f\x7f]*$"
EMAIL_FIELD = "email"  # the parameter model checks this field's value as an address (the map decides the rest)
MAX_CORRECTIONS = 20
HASH_PURPOSE = "rectification-value"
COUNTRY = re.compile(r"[A-Za-z]{2}")


# ---------------------------------------------------------------------------------------------------------------
# The request, as typed


class Correction(BaseModel):
    """One field to correct and its correct value."""

    model_config = ConfigDict(
        extra="forbid",
        str_strip_whitespace=True,
        # The server validates flow parameters with JSON Schema: make it check a new email's form too.
        json_schema_extra={
            "if": {"properties": {"field": {"const": EMAIL_FIELD}}, "required": ["field"]},
            "then": {"properties": {"value": {"pattern": EMAIL_PATTERN, "maxLength": 320}}},
        },
    )

    field: str = Field(
        description="The field to correct, as the data map's rectification section names it, e.g. full_name, "
        "email, phone, billing_address_line1, billing_address_city, billing_address_postal_code, "
        "billing_address_country, language, theme, timezone",
        pattern=FIELD_PATTERN,
    )
    value: str = Field(
        description="The correct value, as the person gave it (one line; a new email is confirmed by a code sent "
        "to it before it is used)",
        min_length=1,
        max_length=10_000,
        pattern=VALUE_PATTERN,
    )

    @model_validator(mode="after")
    def _email_is_an_address(self) -> Correction:
        if self.field == EMAIL_FIELD and (len(self.value) > 320 or not re.fullmatch(EMAIL_PATTERN, self.value)):
            # Never the value: validation messages end up in Prefect state messages and logs.
            raise ValueError("the new email must be a valid email address (name@domain.tld)")
        return self

    def __repr_args__(self) -> Any:  # the value is personal data: masked in reprs, logs and tracebacks
        return [("field", self.field), ("value", Pii(self.value))]


class RectificationInput(BaseModel):
    """The corrections a person asked for: each field at most once."""

    model_config = ConfigDict(extra="forbid")

    corrections: list[Correction] = Field(
        description="The fields to correct and their correct values",
        min_length=1,
        max_length=MAX_CORRECTIONS,
    )

    @model_validator(mode="after")
    def _each_field_once(self) -> RectificationInput:
        seen: set[str] = set()
        for correction in self.corrections:
            if correction.field in seen:
                raise ValueError(f"{correction.field} is given twice: correct each field once per request")
            seen.add(correction.field)
        return self


# ---------------------------------------------------------------------------------------------------------------
# Review against the map (no data read yet), then the plan (old values, read after identity verification)


@dataclass(frozen=True)
class Refusal:
    """A field that is not corrected, and why (told to the person; names and reasons only, never a value)."""

    field: str
    reason: str


@dataclass(frozen=True)
class Accepted:
    """A field the map lets us correct, with its new value."""

    field: str
    value: Pii
    spec: RectifiableField
    is_account_email: bool  # the address codes and answers go to: the new one is confirmed first


@dataclass(frozen=True)
class FieldChange:
    """One field to correct: its new value and the values of record it replaces (copies holding one of those are
    corrected too)."""

    field: str
    new: Pii
    old: tuple[Pii, ...]
    columns: tuple[str, ...]  # "table.column"; the first is the value of record
    stripe_field: str | None
    caseless: bool  # an email: copies compare case-insensitively
    new_mailbox: bool = False  # the account's address changes: the old one is told, and redacted from free text


@dataclass(frozen=True)
class Plan:
    """What will change, read once after identity verification and kept (encrypted) until the request ends, so a
    resumed run corrects the copies of the same old values even after the value of record changed."""

    account_ids: tuple[int, ...]
    changes: tuple[FieldChange, ...]
    unchanged: tuple[str, ...]  # fields that already hold the value asked for
    refused: tuple[Refusal, ...]
    stripe_customer_ids: tuple[str, ...]
    new_email: Pii | None  # set when the account's address changes: confirmed by a code before anything changes

    @property
    def corrected(self) -> list[str]:
        return [change.field for change in self.changes]


@dataclass(frozen=True)
class CorrectionRequest:
    """What the flow keeps about a rectification request between runs (encrypted, deleted when it ends)."""

    contact: Pii  # the address on file when the request arrived: codes, answers and the change notice go there
    accepted: tuple[Accepted, ...]
    refused: tuple[Refusal, ...]
    plan: Plan | None = None


def label(field_name: str) -> str:
    """How a field reads in an email: "billing_address_city" -> "Billing address city"."""
    words = field_name.replace("_", " ").strip()
    return words[:1].upper() + words[1:]


def account_email_field(datamap: DataMap) -> str | None:
    """The rectifiable field whose value of record is the subject's email (where codes and answers go)."""
    subject = datamap.subject
    address = f"{subject.table}.{subject.email_column}"
    fields = datamap.rectification.fields if datamap.rectification else {}
    return next((name for name, spec in fields.items() if spec.columns[0] == address), None)


def _column_kind(datamap: DataMap, reference: str) -> Kind | None:
    table_name, column_name = reference.split(".", 1)
    spec = datamap.table(table_name).columns.get(column_name)
    return spec.kind if spec is not None else None


def review(datamap: DataMap, request: RectificationInput, contact: Pii) -> CorrectionRequest:
    """Sort the requested corrections into accepted and refused, by the data map alone (no data is read).

    Raises ValueError (naming fields, never values) when the map points a field at a Stripe field that does not
    exist: a map error must stop the run before anything changes, not after PostgreSQL was corrected.
    """
    mapping = datamap.rectification
    fields = mapping.fields if mapping is not None else {}
    refused_fields = mapping.refused if mapping is not None else {}
    email_field = account_email_field(datamap)
    accepted: list[Accepted] = []
    refused: list[Refusal] = []
    for correction in request.corrections:
        name, value = correction.field, correction.value
        spec = fields.get(name)
        if name in refused_fields:
            refused.append(Refusal(name, refused_fields[name]))
            continue
        if spec is None:
            known = ", ".join(label(f).lower() for f in fields) or "none"
            refused.append(Refusal(name, f"we hold no field called {name}; the fields we can correct are {known}"))
            continue
        if spec.stripe_field is not None and spec.stripe_field not in CUSTOMER_FIELDS:
            raise ValueError(
                f"data map rectification.fields.{name}.stripe_field: Stripe customers have no field "
                f"{spec.stripe_field} (one of {', '.join(sorted(CUSTOMER_FIELDS))})"
            )
        is_email = _column_kind(datamap, spec.columns[0]) == Kind.email
        if is_email and not re.fullmatch(EMAIL_PATTERN, value):
            refused.append(Refusal(name, "the new value is not a valid email address"))
        elif spec.stripe_field == "address.country" and not COUNTRY.fullmatch(value):
            refused.append(Refusal(name, "a country is given as its two-letter code, e.g. DE or FR"))
        elif len(value) > spec.max_length:
            refused.append(Refusal(name, f"the value is longer than the {spec.max_length} characters it may have"))
        else:
            if spec.stripe_field == "address.country":
                value = value.upper()
            accepted.append(Accepted(name, Pii(value), spec, is_account_email=name == email_field))
    return CorrectionRequest(contact=contact, accepted=tuple(accepted), refused=tuple(refused))


def _split(reference: str) -> tuple[str, str]:
    table_name, column_name = reference.split(".", 1)
    return table_name, column_name


def _account_rows(datamap: DataMap, table_name: str) -> Select[Any]:
    """The primary keys of the table's rows that reach the accounts (bind `account_ids`), over all its reaches."""
    selects = [reach_select(datamap, table_name, i) for i in range(len(datamap.table(table_name).reaches))]
    return selects[0] if len(selects) == 1 else union(*selects).subquery().select()


def values_of(
    connection: Connection, datamap: DataMap, reference: str, account_ids: list[int]
) -> list[str | None]:
    """The values one column ("table.column") holds in the accounts' rows, one per row (None for NULL)."""
    table_name, column_name = _split(reference)
    target = table_clause(datamap, table_name)
    query = select(target.c[column_name]).where(
        primary_key_in(datamap, target, _account_rows(datamap, table_name))
    )
    return [
        None if value is None else str(value)
        for value in connection.execute(query, {"account_ids": account_ids}).scalars()
    ]


def email_taken(connection: Connection, datamap: DataMap, email: str, account_ids: list[int]) -> bool:
    """Whether another account already uses this address (compared case-insensitively, as locate does)."""
    subject = datamap.subject
    accounts = table_clause(datamap, subject.table)
    query = select(func.count()).where(
        func.lower(accounts.c[subject.email_column]) == email.strip().lower(),
        accounts.c[subject.id_column].not_in(account_ids),
    )
    return bool(connection.execute(query).scalar_one())


def plan(
    connection: Connection,
    datamap: DataMap,
    request: CorrectionRequest,
    account_ids: list[int],
    stripe_customer_ids: list[str],
) -> Plan:
    """Read the values of record the accepted corrections replace, and decide what changes.

    Runs after identity verification: whether a field is held, already correct, or whether a new address belongs
    to another account is only told to a verified person.
    """
    changes: list[FieldChange] = []
    unchanged: list[str] = []
    refused = list(request.refused)
    new_email: Pii | None = None
    for accepted in request.accepted:
        spec = accepted.spec
        caseless = _column_kind(datamap, spec.columns[0]) == Kind.email
        held = values_of(connection, datamap, spec.columns[0], account_ids)
        if not held:
            refused.append(Refusal(accepted.field, "we hold no such data for your account: nothing to correct"))
            continue
        new = accepted.value.reveal()
        if all(value == new for value in held):
            unchanged.append(accepted.field)
            continue
        # A new mailbox (not just other capitals) must be free and is confirmed before anything changes.
        new_mailbox = accepted.is_account_email and any(
            value is None or value.strip().lower() != new.lower() for value in held
        )
        if new_mailbox:
            if len(account_ids) > 1:  # one address cannot become the address of several accounts
                refused.append(
                    Refusal(
                        accepted.field, "several accounts use your address: write to us to change them one by one"
                    )
                )
                continue
            if email_taken(connection, datamap, new, account_ids):
                refused.append(Refusal(accepted.field, "another CellCMS account already uses the new address"))
                continue
            new_email = accepted.value
        changes.append(
            FieldChange(
                field=accepted.field,
                new=accepted.value,
                old=tuple(Pii(value) for value in sorted({v for v in held if v is not None and v != new})),
                columns=tuple(spec.columns),
                stripe_field=spec.stripe_field,
                caseless=caseless,
                new_mailbox=new_mailbox,
            )
        )
    return Plan(
        account_ids=tuple(account_ids),
        changes=tuple(changes),
        unchanged=tuple(unchanged),
        refused=tuple(refused),
        stripe_customer_ids=tuple(stripe_customer_ids),
        new_email=new_email,
    )


def value_hash(secret_key: str, value: Pii) -> str:
    """How the audit log names a value it must not hold: a keyed hash (proves a value, reveals none)."""
    return keyed_hash(secret_key, value.reveal(), HASH_PURPOSE)


def hashes(secret_key: str, plan: Plan) -> dict[str, dict[str, Any]]:
    """Per corrected field: keyed hashes of the old values of record and of the new value."""
    return {
        change.field: {
            "old": [value_hash(secret_key, value) for value in change.old],
            "new": value_hash(secret_key, change.new),
        }
        for change in plan.changes
    }


# ---------------------------------------------------------------------------------------------------------------
# Carrying it out in PostgreSQL


@dataclass
class PostgresRectification:
    """What one rectification changed in PostgreSQL: counts per column, never values."""

    corrected: dict[str, int] = field(default_factory=dict)  # "table.column" -> rows corrected
    copies_left: dict[str, int] = field(default_factory=dict)  # rows holding a different value: not a copy, kept
    old_email_redacted: dict[str, int] = field(default_factory=dict)  # free text the old address was removed from

    def summary(self) -> dict[str, Any]:
        return {
            "corrected": self.corrected,
            "copies_left": {k: v for k, v in self.copies_left.items() if v},
            "old_email_redacted": {k: v for k, v in self.old_email_redacted.items() if v},
            "rows": sum(self.corrected.values()) + sum(self.old_email_redacted.values()),
        }


def apply(connection: Connection, datamap: DataMap, plan: Plan) -> PostgresRectification:
    """Correct every planned field in the caller's transaction: the value of record in the accounts' rows, each
    copy where it holds one of the old values, and (for a new account email) the old address in every mapped
    free-text column, wherever it appears."""
    result = PostgresRectification()
    params: dict[str, Any] = {"account_ids": list(plan.account_ids)}
    new_value = bindparam("rectified_value", type_=Text)
    old_values = bindparam("old_values", type_=ARRAY(Text))
    for change in plan.changes:
        values = {
            **params,
            "rectified_value": change.new.reveal(),
            "old_values": sorted(
                {v.reveal().strip().lower() if change.caseless else v.reveal() for v in change.old}
            ),
        }
        record, *copies = change.columns
        table_name, column_name = _split(record)
        target = table_clause(datamap, table_name)
        reached = primary_key_in(datamap, target, _account_rows(datamap, table_name))
        statement = update(target).where(reached).values({column_name: new_value})
        result.corrected[record] = connection.execute(statement, values).rowcount
        for copy in copies:
            table_name, column_name = _split(copy)
            target = table_clause(datamap, table_name)
            reached = primary_key_in(datamap, target, _account_rows(datamap, table_name))
            column = target.c[column_name]
            compared = func.lower(func.btrim(column)) if change.caseless else column
            is_copy = compared == any_(old_values)
            statement = update(target).where(reached, is_copy).values({column_name: new_value})
            result.corrected[copy] = connection.execute(statement, values).rowcount
            left = select(func.count()).where(
                reached, column.is_not(None), ~is_copy, column.is_distinct_from(new_value)
            )
            result.copies_left[copy] = connection.execute(left, values).scalar_one()
    old_emails = [value.reveal() for change in plan.changes if change.new_mailbox for value in change.old]
    if old_emails:
        result.old_email_redacted = redact_old_email(connection, datamap, old_emails)
    return result


def redact_old_email(connection: Connection, datamap: DataMap, old_emails: list[str]) -> dict[str, int]:
    """Replace the old address by [redacted] in every mapped free-text column, in anyone's rows (the same pattern
    the erasure checks use, percent-encoded form included). The new address is never written into free text:
    someone else's document or a log line must not learn it."""
    pattern = text_pattern(SubjectIdentifiers(emails=frozenset(old_emails)), kinds=(Kind.email,))
    if pattern is None:
        return {}
    counts: dict[str, int] = {}
    found = bindparam("pattern", type_=Text)
    for table_name, column_name, _ in datamap.text_columns():
        target = table_clause(datamap, table_name)
        column = target.c[column_name]
        statement = (
            update(target)
            .where(column.op("~*")(found))
            .values({column_name: func.regexp_replace(column, found, REDACTED, "gi")})
        )
        counts[f"{table_name}.{column_name}"] = connection.execute(statement, {"pattern": pattern}).rowcount
    return counts


# ---------------------------------------------------------------------------------------------------------------
# The new address's code (the flow waits for it like for the identity code)


def new_email_verification_id(request_id: str) -> str:
    """The key of the new address's verification in privacy_ops.verifications (the request's own row is the
    identity check's)."""
    return f"{request_id}.new-email"


def awaiting_new_email_code(engine: Engine, request_id: str) -> bool:
    """Whether the request waits for the code sent to a new email address (not for the identity code)."""
    from privacy_ops.lifecycle import verification

    with engine.connect() as connection:
        state = verification.get_verification(connection, new_email_verification_id(request_id))
    return state is not None and state.status == verification.VerificationStatus.pending


def submit_new_email_code(engine: Engine, request_id: str, code: str, timeout: float = 120) -> Verification:
    """Resume the run waiting for the new address's code with `code`, then report the state it reached."""
    from privacy_ops.runner import submit_code

    return submit_code(engine, request_id, code, timeout, verification_id=new_email_verification_id(request_id))

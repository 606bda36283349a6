"""The data map's schema: where personal data lives in CellCMS and what each right does with it.

`datamap/cellcms.yaml` is validated against these models; `loader.py` adds file/line positions and checks the map
against the live database. Everything the flows know about CellCMS comes from here.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Category(StrEnum):
    """The policy's categories of personal data (section 1)."""

    account = "account"
    billing = "billing"
    content = "content"
    communications = "communications"
    usage = "usage"
    device = "device"
    logs = "logs"
    cookies = "cookies"


class Kind(StrEnum):
    """What a column holds; decides how checks look for leftovers and how free text is redacted."""

    email = "email"
    name = "name"
    phone = "phone"
    address = "address"
    ip = "ip"
    free_text = "free_text"
    birth_date = "birth_date"
    secret = "secret"  # password hashes and the like: never exported
    device_id = "device_id"
    external_id = "external_id"  # Stripe ids, S3 keys
    account_ref = "account_ref"
    other = "other"


class FieldAction(StrEnum):
    """What erasure does to one column of a row that is kept (anonymised or retained)."""

    keep = "keep"
    set_null = "set_null"
    # A deterministic keyed hash of the subject: rows stay linkable to each other, not to the person.
    keyed_pseudonym = "keyed_pseudonym"
    generic_replacement = "generic_replacement"  # a fixed value, e.g. "Erased user"
    redact_identifiers = "redact_identifiers"  # free text: the subject's identifiers replaced by [redacted]


class RowAction(StrEnum):
    """What erasure does to a row that reaches the subject."""

    delete_row = "delete_row"
    anonymise = "anonymise"  # keep the row, apply the field actions
    retain = "retain"  # keep the row for a legal basis and a period, apply the field actions


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Column(Strict):
    kind: Kind
    category: Category | None = None  # defaults to the table's
    erasure: FieldAction = FieldAction.keep
    replacement: str | None = None  # for generic_replacement
    identifier: bool = False  # its values identify the subject: collected, then searched for after erasure
    exported: bool = True  # False for secrets: the access package shows that the value exists, not the value

    @model_validator(mode="after")
    def _replacement_given(self) -> Column:
        if (self.erasure == FieldAction.generic_replacement) != (self.replacement is not None):
            raise ValueError("replacement is required with, and only with, erasure: generic_replacement")
        return self


class Reach(Strict):
    """How a row reaches the account: `column` holds an account id, or (with `through`) a key of another table."""

    column: str
    through: str | None = None  # the table `column` references (by its primary key); that table's reach continues
    erasure: RowAction
    role: str = "owner"  # a name for the relation in the access package, e.g. "owner", "author"


class Retention(Strict):
    legal_basis: str
    period_days: Annotated[int, Field(gt=0, le=36500)]
    clock_column: str  # the date the period runs from


class Table(Strict):
    category: Category
    primary_key: list[str] = ["id"]
    reaches: list[Reach]
    columns: dict[str, Column] = {}
    retention: Retention | None = None  # required when a reach retains
    portable: bool = False  # data the person provided: in the portability package (GDPR art. 20)
    collected_at: str | None = None  # when a row was collected: the CCPA right to know covers the last 12 months

    @model_validator(mode="after")
    def _retention_given(self) -> Table:
        retains = any(r.erasure == RowAction.retain for r in self.reaches)
        if retains and self.retention is None:
            raise ValueError(
                "a reach with erasure: retain needs a retention block (legal_basis, period_days, clock_column)"
            )
        return self


class ConsentCondition(Strict):
    """Rows of accounts that have no granted consent of `category` in `table` (e.g. the analytics cookie)."""

    table: str
    category_column: str = "category"
    category: str
    granted_column: str = "granted"


class Subject(Strict):
    """The table of accounts: where an identity (email or account id) is resolved."""

    table: str
    id_column: str
    email_column: str  # verification codes go to this address on file, never to a typed one
    deleted_column: str | None = None  # set when the account was deleted: not active (policy notices skip it)
    # Compared before and after every request: exercising a right must not change them (CCPA non-discrimination).
    service_terms_columns: list[str] = []


ColumnRef = Annotated[str, Field(pattern=r"^[a-z_][a-z0-9_]*\.[a-z_][a-z0-9_]*$")]  # "table.column"


class RectifiableField(Strict):
    """A value a person may have corrected (GDPR art. 16), and every mapped place a copy of it lives.

    The first column is the value of record; the others are copies, corrected where they hold the same old
    value (a billing name that differs from the account name is a different value, not a copy).
    """

    columns: Annotated[list[ColumnRef], Field(min_length=1)]
    stripe_field: str | None = None  # the Stripe customer's field, dotted for nested ones (address.city)
    max_length: Annotated[int, Field(gt=0, le=10_000)] = 200


class Rectification(Strict):
    fields: dict[str, RectifiableField]
    refused: dict[str, str] = {}  # field -> why it is not corrected (told to the person)


class Purpose(Strict):
    """A purpose of processing a person can object to (GDPR art. 21; the CCPA opt-out is `sale_or_sharing`)."""

    description: str
    collected: list[str] = []  # tables collected for this purpose only: the account's rows deleted on objection
    outputs: list[str] = []  # tables computed for this purpose: the account leaves them on restriction/objection
    switches: list[ColumnRef] = []  # booleans that allow this processing: turned off on objection
    consent: ConsentCondition | None = None  # the cookie consent withdrawn on objection
    restrictable: bool = True  # stops while processing is restricted (GDPR art. 18)


class Processing(Strict):
    restriction_column: str  # on the subject table: set while processing is restricted
    objections_table: str  # account_id, purpose, source, objected_at; unique (account_id, purpose)
    purposes: dict[Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,62}$")], Purpose]


class Disclosure(Strict):
    """What the CCPA right to know discloses about a category (privacy policy sections 1, 2 and 5)."""

    description: str
    sources: list[str]
    purposes: list[str]
    shared_with: list[str] = []


class S3Location(Strict):
    bucket_setting: str  # a Settings field naming the bucket, e.g. content_bucket
    prefix: str  # templated by {account_id}
    category: Category
    erasure: RowAction = RowAction.delete_row  # delete_row: every version and delete marker under the prefix

    @model_validator(mode="after")
    def _templated(self) -> S3Location:
        if "{account_id}" not in self.prefix:
            raise ValueError("prefix must contain {account_id}")
        return self


class StripeCustomer(Strict):
    """The Stripe customer of an account and what erasure does with it."""

    customer_id_table: str
    customer_id_column: str
    category: Category = Category.billing
    # Detach payment methods, blank the customer's personal fields, delete the customer. Invoices stay in Stripe
    # (tax law) but hold no more than Stripe's own copy.
    erasure: RowAction = RowAction.delete_row


class RetentionAction(StrEnum):
    """What a retention rule does with what has expired."""

    erase_account = "erase_account"  # the whole erasure map: every row, S3 prefix and Stripe customer
    erase_categories = "erase_categories"  # the erasure map restricted to `categories` (and their S3 locations)
    delete_rows = "delete_rows"  # delete the expired rows of `table`
    anonymise_columns = "anonymise_columns"  # keep the rows, apply `columns` (an Anonymiser each)
    purge_objects = "purge_objects"  # every version of the S3 objects under `prefix` older than the period
    expire_requests = "expire_requests"  # privacy requests whose identity verification expired: denied


class Anonymiser(StrEnum):
    """How `anonymise_columns` makes one column of an expired row anonymous; each is idempotent."""

    truncate_ip = "truncate_ip"  # IPv4 to its /24 network, IPv6 to its /48
    set_null = "set_null"
    redact_contacts = "redact_contacts"  # email and IP addresses in free text replaced by [redacted]


class AgeLimit(Strict):
    """Accounts of people younger than `years` on the run's date, by a birth-date column."""

    column: str
    years: Annotated[int, Field(gt=0, le=100)]


# Account-level actions select accounts (rows of the subject table); the others select rows of `table`.
ACCOUNT_ACTIONS = frozenset({RetentionAction.erase_account, RetentionAction.erase_categories})
ROW_ACTIONS = frozenset({RetentionAction.delete_rows, RetentionAction.anonymise_columns})


class RetentionRule(Strict):
    """One time limit of the policy: what it selects, as of a date, and what happens at expiry.

    A row (account) is selected when ANY of the conditions given holds: its `clock_column` is older than
    `period_days`; (accounts) its `younger_than` birth date is under the age, or its `flag_column` is true;
    (rows) its account lacks the `without_consent` consent. Held accounts and rows are never selected.
    """

    description: str
    action: RetentionAction
    table: str | None = None  # the subject table for account-level actions, the table of the rows otherwise
    clock_column: str | None = None
    period_days: Annotated[int, Field(gt=0, le=36500)] | None = None
    younger_than: AgeLimit | None = None
    flag_column: str | None = None
    without_consent: ConsentCondition | None = None
    categories: list[Category] = []  # erase_categories
    columns: dict[str, Anonymiser] = {}  # anonymise_columns
    bucket_setting: str | None = None  # purge_objects: a Settings field naming the bucket
    prefix: str = ""  # purge_objects
    notify_subject: bool = False  # email the account's address before erasing it (recorded as a count)

    @model_validator(mode="after")
    def _consistent(self) -> RetentionRule:
        if (self.clock_column is None) != (self.period_days is None) and self.action != "purge_objects":
            raise ValueError("clock_column and period_days go together")
        conditions = [self.clock_column, self.younger_than, self.flag_column, self.without_consent]
        if self.action in ACCOUNT_ACTIONS | ROW_ACTIONS:
            if self.table is None:
                raise ValueError(f"action {self.action} needs a table")
            if not any(c is not None for c in conditions):
                raise ValueError(
                    "a rule needs a condition: clock_column + period_days, younger_than, flag_column or "
                    "without_consent"
                )
        if self.action in ACCOUNT_ACTIONS and self.without_consent is not None:
            raise ValueError("without_consent selects rows, not accounts: use delete_rows or anonymise_columns")
        if self.action in ROW_ACTIONS and (self.younger_than is not None or self.flag_column is not None):
            raise ValueError("younger_than and flag_column select accounts: use erase_account or erase_categories")
        if (self.action == RetentionAction.erase_categories) != bool(self.categories):
            raise ValueError("categories are required with, and only with, action: erase_categories")
        if (self.action == RetentionAction.anonymise_columns) != bool(self.columns):
            raise ValueError("columns are required with, and only with, action: anonymise_columns")
        if self.action == RetentionAction.purge_objects and (
            self.bucket_setting is None or self.period_days is None
        ):
            raise ValueError("purge_objects needs bucket_setting and period_days")
        if self.notify_subject and self.action != RetentionAction.erase_account:
            raise ValueError("notify_subject is only for erase_account")
        return self


class RetentionPolicy(Strict):
    """The nightly retention rules, applied in the order written; names appear in audit keys and reports."""

    batch_size: Annotated[int, Field(gt=0, le=100_000)] = 1000
    rules: dict[Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,62}$")], RetentionRule]


class Postgres(Strict):
    schema_: str = Field("public", alias="schema")
    tables: dict[str, Table]


class DataMap(Strict):
    version: int
    subject: Subject
    postgres: Postgres
    s3: dict[str, S3Location] = {}
    stripe: StripeCustomer | None = None
    retention: RetentionPolicy | None = None
    rectification: Rectification | None = None
    processing: Processing | None = None
    disclosures: dict[Category, Disclosure] = {}

    def table(self, name: str) -> Table:
        return self.postgres.tables[name]

    def identifier_columns(self) -> list[tuple[str, str, Column]]:
        """(table, column, spec) of every column whose values identify the subject."""
        return [
            (t, c, spec)
            for t, table in self.postgres.tables.items()
            for c, spec in table.columns.items()
            if spec.identifier
        ]

    def text_columns(self) -> list[tuple[str, str, Column]]:
        """(table, column, spec) of free-text columns: searched for mentions of the subject anywhere."""
        return [
            (t, c, spec)
            for t, table in self.postgres.tables.items()
            for c, spec in table.columns.items()
            if spec.kind == Kind.free_text
        ]

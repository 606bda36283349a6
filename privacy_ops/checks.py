"""Great Expectations suites that prove an erasure left nothing of the subject behind, and checks of the packages
handed to a person (access, portability, right to know) read back from S3.

The erasure suites are built from the data map, never by hand. In PostgreSQL, for every mapped table:
- every column whose kind holds an identifier (email, name, phone, address, IP, external or device id) holds
  none of the subject's values of that kind; all such columns, not only `identifier: true` ones, since a copy
  elsewhere (a retained invoice's billing_email) is the person's data too;
- every free-text column mentions none of them: a case-insensitive LIKE search first (cheap), then, for columns
  with hits, the whole-word regex `text_pattern` decides ("10.0.0.1" is not in "10.0.0.15");
- every column holding an account id (`account_ref` columns, reach columns without `through`) holds none of the
  subject's, so the account row, owned rows and links of retained rows (invoices.account_id) are gone;
- rows kept under the subject's pseudonym (a `keyed_pseudonym` column) have their `set_null` columns null and their
  `generic_replacement` columns replaced.
Rows reached only `through` another table need no check of their own: their foreign key keeps them from outliving
the row checked upstream. S3 (a listing of every version and delete marker left) and Stripe (the customers left)
are checked as pandas frames the caller lists.

Privacy: GX results and expectation configurations carry the values searched for (value sets, regexes) and, by
default, samples of offending rows. None of that leaves this module: `CheckResult` holds only names and counts;
samples are switched off (partial_unexpected_count 0), GX's loggers are silenced while it runs, SQLAlchemy hides
bound parameters from its logs and exception messages, and exceptions are re-raised as `CheckError` naming only the
asset and the exception class. `SubjectIdentifiers` prints counts, never values.

Great Expectations is imported inside the functions: the import costs about 5 s, which the CLI must not pay.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import re
import string
import threading
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from privacy_ops.datamap.model import Category, Column, DataMap, FieldAction, Kind

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "FREE_TEXT_KINDS",
    "CheckError",
    "CheckResult",
    "DocsPage",
    "Failure",
    "SubjectIdentifiers",
    "access_package_checks",
    "erasure_checks",
    "retention_checks",
    "rights_package_checks",
    "text_pattern",
]

# Which of the subject's values a column of each kind is compared with. Device ids travel with external ids.
_VALUES_OF_KIND: dict[Kind, str] = {
    Kind.email: "emails",
    Kind.name: "names",
    Kind.phone: "phones",
    Kind.address: "addresses",
    Kind.ip: "ips",
    Kind.external_id: "external_ids",
    Kind.device_id: "external_ids",
}
# People type these in any case; the others are compared exactly (IPs after normalisation).
_CASELESS_KINDS = frozenset({Kind.email, Kind.name, Kind.address})
# What free text is searched for. Addresses stay out: "1 Main St" would match other people's text.
FREE_TEXT_KINDS: tuple[Kind, ...] = (Kind.email, Kind.name, Kind.phone, Kind.ip, Kind.external_id)

# BASIC gives unexpected_count; a partial_unexpected_count of 0 keeps sample values out of the results and turns
# GX's sample query into a LIMIT 0, which PostgreSQL answers without scanning the table.
_RESULT_FORMAT: dict[str, Any] = {"result_format": "BASIC", "partial_unexpected_count": 0}
_DATABASE_URL_VARIABLE = "privacy_ops_checks_database_url"
_CLASS_NAME = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*", re.ASCII)
# GX keeps one "current" context in a module global (its project manager) that validation runs consult, so two
# runs in the threads of one process (Prefect's default task runner) must not interleave.
_GX_LOCK = threading.Lock()


class CheckError(RuntimeError):
    """A suite could not run. Its message names the asset and the exception class only; the cause is dropped
    because its message may quote the values searched for."""


# ---------------------------------------------------------------------------------------------------- the subject
@dataclass(frozen=True, repr=False)
class SubjectIdentifiers:
    """The values to hunt for after an erasure. Never logged: repr() shows counts only.

    Blank strings are dropped on construction: an empty alternative in a regex would match every text.
    """

    emails: frozenset[str] = frozenset()
    names: frozenset[str] = frozenset()
    phones: frozenset[str] = frozenset()
    ips: frozenset[str] = frozenset()
    addresses: frozenset[str] = frozenset()
    external_ids: frozenset[str] = frozenset()  # Stripe customer ids, device ids, VAT numbers, ...
    account_ids: frozenset[int] = frozenset()
    s3_prefixes: frozenset[str] = frozenset()  # e.g. "accounts/123/"; the data map's prefixes are added anyway
    # What rows retained after erasure carry instead of the subject (privacy_ops.pii.pseudonym).
    pseudonyms: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            if name != "account_ids":
                values = frozenset(v for v in getattr(self, name) if isinstance(v, str) and v.strip())
                object.__setattr__(self, name, values)
        object.__setattr__(self, "account_ids", frozenset(int(a) for a in self.account_ids))

    def __repr__(self) -> str:
        counts = ", ".join(f"{name}=<{len(getattr(self, name))}>" for name in self.__dataclass_fields__)
        return f"SubjectIdentifiers({counts})"

    __str__ = __repr__

    @classmethod
    def from_kinds(
        cls,
        values: Mapping[Kind, Iterable[str]],
        *,
        account_ids: Iterable[int] = (),
        s3_prefixes: Iterable[str] = (),
        pseudonyms: Iterable[str] = (),
    ) -> SubjectIdentifiers:
        """From identifier values grouped by the data map's kinds (as `stores.postgres.collect_identifiers`
        gives)."""
        grouped: dict[str, set[str]] = {}
        for kind, found in values.items():
            attribute = _VALUES_OF_KIND.get(kind)
            if attribute:
                grouped.setdefault(attribute, set()).update(found)
        return cls(
            **{name: frozenset(found) for name, found in grouped.items()},
            account_ids=frozenset(account_ids),
            s3_prefixes=frozenset(s3_prefixes),
            pseudonyms=frozenset(pseudonyms),
        )

    def by_kind(self, kind: Kind) -> frozenset[str]:
        """The subject's values a column of `kind` must not hold (empty for kinds that hold no identifier)."""
        attribute = _VALUES_OF_KIND.get(kind)
        return getattr(self, attribute) if attribute else frozenset()


# ---------------------------------------------------------------------------------------------------- the result
@dataclass(frozen=True)
class Failure:
    """One expectation that did not hold. Names and a count only: safe to log, audit and publish."""

    asset: str  # a table name, "s3_versions", "stripe_customers" or "manifest"
    column: str | None  # None for table-level expectations
    expectation: str  # the GX expectation type, e.g. "expect_column_values_to_not_be_in_set"
    unexpected_count: int | None  # None for table-level expectations and when it could not be evaluated
    check: str = ""  # what was looked for: identifier, mention, account_id, retained_row, s3_prefix, ...
    error: str | None = None  # the exception class when it could not be evaluated; never the message


@dataclass(frozen=True)
class DocsPage:
    """One Data Docs validation page built for a suite (retention_checks with docs_dir only)."""

    suite: str  # e.g. "retention.access_log_network_data.leftover"
    success: bool
    path: str  # relative to the docs directory, POSIX separators, e.g. "validations/retention/.../x.html"


@dataclass(frozen=True)
class CheckResult:
    """The outcome of a suite run: what was checked and what failed, without any of the values searched for."""

    suite: str
    success: bool
    expectations: int
    failures: tuple[Failure, ...] = ()
    docs_pages: tuple[DocsPage, ...] = ()  # Data Docs validation pages, when they were built

    def summary(self) -> dict[str, Any]:
        """A JSON-able dict for the audit log and Prefect artifacts."""
        return {
            "suite": self.suite,
            "success": self.success,
            "expectations": self.expectations,
            "failures": [
                {
                    "asset": f.asset,
                    "column": f.column,
                    "check": f.check,
                    "expectation": f.expectation,
                    "unexpected_count": f.unexpected_count,
                    **({"error": f.error} if f.error else {}),
                }
                for f in self.failures
            ],
        }


# ---------------------------------------------------------------------------------------------------- patterns
Flavor = Literal["postgres", "python"]
# Edges are enforced only where the value begins or ends with a letter or digit: "10.0.0.1" must not match inside
# "10.0.0.12", nor "Ann" inside "Anna"; underscores count as separators ("jane_doe.pdf"). PostgreSQL's \b is a
# backspace and its \m/\M treat "_" as a letter, so lookarounds (supported by AREs) are used in both flavors.
_BOUNDARIES: dict[Flavor, tuple[str, str]] = {
    "postgres": ("(?<![[:alnum:]])", "(?![[:alnum:]])"),
    "python": (r"(?<![^\W_])", r"(?![^\W_])"),
}
_MIN_PHONE_DIGITS = 7  # shorter digit runs would match dates and amounts
_LIKE_ESCAPE = "!"  # GX advises against a backslash, which some dialects treat specially


def _text_tokens(subject: SubjectIdentifiers, kinds: Iterable[Kind]) -> set[str]:
    """The strings whose presence in free text is a mention of the subject: the values themselves, emails also
    percent-encoded (in referrers and S3 keys "@" is "%40"), phones also as bare digits, IPs also as host() prints
    them."""
    tokens: set[str] = set()
    for kind in kinds:
        for raw in subject.by_kind(kind):
            value = raw.strip()
            tokens.add(value)
            if kind == Kind.email:
                tokens.add(urllib.parse.quote(value, safe=""))
            elif (
                kind == Kind.phone and len(digits := "".join(c for c in value if c.isdigit())) >= _MIN_PHONE_DIGITS
            ):
                tokens.add(digits)
            elif kind == Kind.ip and (normal := _normal_ip(value)):
                tokens.add(normal)
    return tokens


def _escape(value: str, flavor: Flavor) -> str:
    """A regex matching `value` literally. In an ARE a backslash before ASCII punctuation makes it literal, while
    before a letter or digit it starts an escape (\\m, \\y, ...): only punctuation is escaped."""
    if flavor == "python":
        return re.escape(value)
    return "".join("\\" + c if c in string.punctuation else c for c in value)


def _literal(value: str, flavor: Flavor) -> str:
    before, after = _BOUNDARIES[flavor]
    head = before if value[0].isalnum() else ""
    tail = after if value[-1].isalnum() else ""
    return head + _escape(value, flavor) + tail


def _normal_ip(value: str) -> str | None:
    """The address as PostgreSQL's host() prints it ("10.0.0.9", compressed lower-case IPv6), or None."""
    try:
        return str(ipaddress.ip_interface(value.strip()).ip)
    except ValueError:
        return None


def text_pattern(
    subject: SubjectIdentifiers, *, flavor: Flavor = "postgres", kinds: Iterable[Kind] = FREE_TEXT_KINDS
) -> str | None:
    """One case-insensitive regex finding a mention of the subject (a value of `kinds`) in free text; None if the
    subject has no such value.

    flavor "postgres" gives an ARE for `~` and `regexp_replace` (redaction can use the very pattern that is
    checked), "python" one for `re` and pandas. Values match as whole words where they begin or end with a letter
    or digit.
    """
    tokens = _text_tokens(subject, kinds)
    if not tokens:
        return None
    # A leading (?i) is an embedded option in PostgreSQL AREs too (verified on PostgreSQL 18, non-ASCII included).
    # Sorted: the same subject always gives the same pattern.
    return "(?i)(?:" + "|".join(sorted(_literal(t, flavor) for t in tokens)) + ")"


def _like_patterns(subject: SubjectIdentifiers) -> list[str]:
    """LIKE patterns for lower-cased text: a necessary condition of text_pattern, several times cheaper to test.

    PostgreSQL's regex engine costs about a microsecond per alternative and row; LIKE on text lower-cased once is
    two to four times faster on the same data (measured on 1.5M log rows). Substrings match too ("10.0.0.1" in
    "10.0.0.15"), so columns with hits are confirmed with text_pattern.
    """
    patterns: set[str] = set()
    for token in _text_tokens(subject, FREE_TEXT_KINDS):
        for variant in _caseless_variants(token):
            escaped = "".join(_LIKE_ESCAPE + c if c in f"%_{_LIKE_ESCAPE}" else c for c in variant)
            patterns.add(f"%{escaped}%")
    return sorted(patterns)


def _caseless_variants(value: str) -> set[str]:
    # PostgreSQL's lower() follows the database's LC_CTYPE: under "C" it lowers ASCII only ("ZOË" -> "zoË").
    return {value.lower(), "".join(c.lower() if c.isascii() else c for c in value)}


def _value_set(kind: Kind, values: Iterable[str]) -> list[str]:
    """The values as the checked column presents them (lower-cased, host() of inet) for an exact comparison."""
    result: set[str] = set()
    for value in values:
        if kind in _CASELESS_KINDS:
            result |= _caseless_variants(value)
        elif kind == Kind.ip:
            result |= {value, *filter(None, [_normal_ip(value)])}
        else:
            result.add(value)
    return sorted(result)


# ---------------------------------------------------------------------------------------------------- the plans
@dataclass(frozen=True)
class _Spec:
    """One expectation to build: a GX class name and its arguments (which may hold the subject's values)."""

    check: str
    column: str | None
    expectation: str  # a class in great_expectations.expectations
    kwargs: Mapping[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class _TablePlan:
    """A query asset over one table: only the columns checked, each as the expression it is compared through."""

    table: str
    select: dict[str, str] = field(default_factory=dict)  # output column -> SQL expression
    specs: list[_Spec] = field(default_factory=list)
    text_columns: list[str] = field(default_factory=list)  # searched with LIKE, hits confirmed by text_pattern

    def query(self, schema: str) -> str:
        columns = ", ".join(f"{expression} AS {_quote(alias)}" for alias, expression in self.select.items())
        # OFFSET 0 keeps PostgreSQL from inlining this into GX's wrapping query, which would lower() the text
        # once per LIKE pattern instead of once per row.
        fence = " OFFSET 0" if self.text_columns else ""
        return f"SELECT {columns} FROM {_quote(schema)}.{_quote(self.table)}{fence}"

    def text_query(self, schema: str, columns: Iterable[str]) -> str:
        """The free-text columns as they are, for the regex that confirms LIKE hits."""
        selected = ", ".join(_quote(column) for column in columns)
        return f"SELECT {selected} FROM {_quote(schema)}.{_quote(self.table)}"


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _postgres_plans(
    datamap: DataMap, subject: SubjectIdentifiers, inet_columns: set[tuple[str, str]]
) -> list[_TablePlan]:
    """What to check in each mapped table: from the data map alone, plus which IP columns are of type inet."""
    like_patterns = _like_patterns(subject)
    account_ids = sorted(subject.account_ids)
    plans: list[_TablePlan] = []
    for table_name, table in datamap.postgres.tables.items():
        plan = _TablePlan(table_name)
        for column, spec in table.columns.items():
            quoted = _quote(column)
            if values := subject.by_kind(spec.kind):
                if spec.kind in _CASELESS_KINDS:
                    plan.select[column] = f"lower({quoted})"
                elif spec.kind == Kind.ip and (table_name, column) in inet_columns:
                    plan.select[column] = f"host({quoted})"  # inet::text would print "10.0.0.9/32"
                else:
                    plan.select[column] = quoted
                value_set = {"value_set": _value_set(spec.kind, values)}
                plan.specs.append(_Spec("identifier", column, "ExpectColumnValuesToNotBeInSet", value_set))
            elif spec.kind == Kind.free_text and like_patterns:
                plan.select[column] = f"lower({quoted})"
                plan.text_columns.append(column)
                likes = {"like_pattern_list": like_patterns, "escape": _LIKE_ESCAPE}
                plan.specs.append(_Spec("mention", column, "ExpectColumnValuesToNotMatchLikePatternList", likes))
        id_columns = [c for c, spec in table.columns.items() if spec.kind == Kind.account_ref]
        id_columns += [reach.column for reach in table.reaches if reach.through is None]
        for column in dict.fromkeys(id_columns) if account_ids else ():  # dict: ordered, without duplicates
            plan.select.setdefault(column, _quote(column))
            ids: dict[str, Any] = {"value_set": account_ids}
            plan.specs.append(_Spec("account_id", column, "ExpectColumnValuesToNotBeInSet", ids))
        plan.specs += _retained_row_specs(plan, table.columns, subject)
        if plan.specs:
            plans.append(plan)
    return plans


def _retained_row_specs(
    plan: _TablePlan, columns: Mapping[str, Column], subject: SubjectIdentifiers
) -> list[_Spec]:
    """Rows kept under the subject's pseudonym (e.g. invoices kept for tax law) hold nothing else of them: their
    set_null columns are null and their generic_replacement columns hold the replacement. Adds the columns these
    need to `plan.select`."""
    keys = [c for c, spec in columns.items() if spec.erasure == FieldAction.keyed_pseudonym]
    if not subject.pseudonyms or not keys:
        return []
    from great_expectations.expectations.row_conditions import Column as RowColumn

    specs: list[_Spec] = []
    for key in keys:
        # Pseudonyms are lower-case hex, so a key column selected through lower() compares the same.
        plan.select.setdefault(key, _quote(key))
        of_subject = RowColumn(key).is_in(sorted(subject.pseudonyms))
        for column, spec in columns.items():
            if spec.erasure == FieldAction.set_null:
                plan.select.setdefault(column, _quote(column))
                specs.append(
                    _Spec("retained_row", column, "ExpectColumnValuesToBeNull", {"row_condition": of_subject})
                )
            elif spec.erasure == FieldAction.generic_replacement and spec.replacement is not None:
                lowered = plan.select.setdefault(column, _quote(column)).startswith("lower(")
                replacement = spec.replacement.lower() if lowered else spec.replacement
                specs.append(
                    _Spec(
                        "retained_row",
                        column,
                        "ExpectColumnValuesToBeInSet",
                        {"value_set": [replacement], "row_condition": of_subject},
                    )
                )
    return specs


def _s3_specs(datamap: DataMap, subject: SubjectIdentifiers) -> list[_Spec]:
    prefixes = set(subject.s3_prefixes)
    for location in datamap.s3.values():
        prefixes |= {location.prefix.format(account_id=a) for a in subject.account_ids}
    specs = [_Spec("listing", "key", "ExpectColumnToExist")]
    if prefixes:
        regex = "^(?:" + "|".join(re.escape(p) for p in sorted(prefixes)) + ")"
        specs.append(_Spec("s3_prefix", "key", "ExpectColumnValuesToNotMatchRegex", {"regex": regex}))
    if pattern := text_pattern(subject, flavor="python", kinds=(Kind.email, Kind.name)):
        specs.append(_Spec("mention", "key", "ExpectColumnValuesToNotMatchRegex", {"regex": pattern}))
    return specs


def _stripe_frame(customers: pd.DataFrame) -> pd.DataFrame:
    """A copy of the listing as it is compared: email and name lower-cased (a pandas asset cannot transform), and
    the id of a deleted customer blanked: real Stripe still answers a deleted customer's id with deleted: true."""
    frame = customers.copy()
    for column in ("email", "name"):
        if column in frame.columns:
            frame[column] = frame[column].map(lambda v: v.lower() if isinstance(v, str) else v)
    if "deleted" in frame.columns and "id" in frame.columns:
        deleted = frame["deleted"].map(lambda v: v is True or v == 1)
        frame["id"] = frame["id"].where(~deleted.astype(bool), None)
    return frame


def _stripe_specs(subject: SubjectIdentifiers) -> list[_Spec]:
    columns = {"column_set": ["id", "email", "name", "phone"], "exact_match": False}
    specs = [_Spec("listing", None, "ExpectTableColumnsToMatchSet", columns)]
    for column, kind in (
        ("id", Kind.external_id),
        ("email", Kind.email),
        ("name", Kind.name),
        ("phone", Kind.phone),
    ):
        if values := subject.by_kind(kind):
            value_set = sorted({v.lower() for v in values} if kind in _CASELESS_KINDS else values)
            specs.append(_Spec("identifier", column, "ExpectColumnValuesToNotBeInSet", {"value_set": value_set}))
    return specs


def _manifest_specs(account_ids: set[int]) -> list[_Spec]:
    columns = {"column_set": ["table", "category", "account_id", "rows"], "exact_match": False}
    specs = [
        _Spec("columns", None, "ExpectTableColumnsToMatchSet", columns),
        _Spec("table", "table", "ExpectColumnValuesToNotBeNull"),
        _Spec("table", "table", "ExpectColumnValueLengthsToBeBetween", {"min_value": 1}),
        _Spec(
            "category", "category", "ExpectColumnValuesToBeInSet", {"value_set": sorted(c.value for c in Category)}
        ),
        _Spec("rows", "rows", "ExpectColumnValuesToNotBeNull"),
        _Spec("rows", "rows", "ExpectColumnValuesToBeBetween", {"min_value": 0}),
    ]
    # Rows of other accounts must never be in a package; mention rows (found in others' free text) have no account.
    if account_ids:
        specs.append(
            _Spec("account_id", "account_id", "ExpectColumnValuesToBeInSet", {"value_set": sorted(account_ids)})
        )
    else:
        specs.append(_Spec("account_id", "account_id", "ExpectColumnValuesToBeNull"))
    return specs


# ---------------------------------------------------------------------------------------------------- running GX
@contextlib.contextmanager
def _quiet_gx() -> Iterator[None]:
    """Silence GX's loggers while it holds the subject's values.

    Checked on 1.24.1: at INFO and DEBUG it logs no values (SQL with placeholders only), but its error paths log
    exception messages, and a driver's message can quote a value. CheckResult carries what is needed. The children
    of the "great_expectations" logger inherit its level.
    """
    gx_logger = logging.getLogger("great_expectations")
    level = gx_logger.level
    gx_logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        gx_logger.setLevel(level)


_DOCS_SITE = "run"


def _new_context(runtime_environment: dict[str, str], docs_dir: Path | None = None) -> Any:
    """An ephemeral GX context: in-memory stores, no progress bars (tqdm would flood the output), and no Data
    Docs site (the default one reserves a temporary directory) unless `docs_dir` is given: then one filesystem
    site writing there (verified on 1.24.1: an ephemeral context's in-memory stores build Data Docs fine)."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    sites: dict[str, Any] = {}
    if docs_dir is not None:
        sites[_DOCS_SITE] = {
            "class_name": "SiteBuilder",
            "show_how_to_buttons": False,
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            # Validation pages only: a suite's own page repeats what its validation page shows.
            "site_section_builders": {"expectations": "None"},
        }
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        progress_bars=ProgressBarsConfig(globally=False),
        analytics_enabled=False,
        data_docs_sites=sites or None,
    )
    return gx.get_context(mode="ephemeral", project_config=config, runtime_environment=runtime_environment)


def _run_suite(
    context: Any, name: str, asset: str, batch_definition: Any, specs: list[_Spec], **run_kwargs: Any
) -> list[Failure]:
    """Validate one batch against `specs` as suite `name`; return the failures, without values. The result is
    kept in the context's (in-memory) validation store, where `_build_docs` finds it."""
    import great_expectations as gx
    import great_expectations.expectations as gxe

    expectations = context.suites.add(gx.ExpectationSuite(name=name))
    for spec in specs:
        column = {"column": spec.column} if spec.column else {}
        expectations.add_expectation(
            getattr(gxe, spec.expectation)(**column, **spec.kwargs, meta={"check": spec.check})
        )
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=name, data=batch_definition, suite=expectations)
    )
    try:
        outcome = definition.run(result_format=_RESULT_FORMAT, **run_kwargs)
    except Exception as exc:
        # The cause is not chained: its message may quote SQL parameters, i.e. the subject's values.
        raise CheckError(f"{name} could not run: {type(exc).__name__}") from None
    failures = []
    for result in outcome.results:
        if not result.success:
            config = result.expectation_config
            error = _exception_class(result.exception_info)
            failures.append(
                Failure(
                    asset=asset,
                    column=config.kwargs.get("column"),
                    expectation=config.type,
                    unexpected_count=None if error else (result.result or {}).get("unexpected_count"),
                    check=str((config.meta or {}).get("check", "")),
                    error=error,
                )
            )
    return failures


def _build_docs(context: Any, suites: list[str]) -> list[DocsPage]:
    """Render the validations of the context (a context from `_new_context(..., docs_dir)`) into its Data Docs
    site, and return their pages in the order of `suites`. Never for suites whose expectations hold a person's
    values: the pages print every expectation's arguments.

    One build for all suites: GX compiles its page templates anew for every build, which cost about 0.7 s per
    suite when each validation updated the site on its own. No index page: nothing links it (it is filled by
    JavaScript from public CDNs, see `data_docs`), and rendering it took a third of the build."""
    context.build_data_docs(site_names=[_DOCS_SITE], build_index=False)
    store = context.validation_results_store
    site = Path(str(context.get_config().data_docs_sites[_DOCS_SITE]["store_backend"]["base_directory"]))
    pages = []
    for identifier in store.list_keys():
        (url,) = (
            s["site_url"]
            for s in context.get_docs_sites_urls(resource_identifier=identifier, site_name=_DOCS_SITE)
        )
        # The page's path mirrors the identifier (suite name split at dots, run name, run time, batch id).
        page = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).resolve().relative_to(site.resolve())
        suite = identifier.expectation_suite_identifier.name
        pages.append(DocsPage(suite=suite, success=bool(store.get(identifier).success), path=page.as_posix()))
    return sorted(pages, key=lambda page: suites.index(page.suite))


def _exception_class(exception_info: Mapping[str, Any] | None) -> str | None:
    """The class of the exception at the root of what an expectation raised, or None; never its message, which
    may quote values.

    GX reports {"raised_exception": ..., "exception_traceback": ...}, or such a report per metric when a metric
    failed. The root cause heads the first unindented line after the first "Traceback" header (e.g.
    "psycopg.errors.UndefinedColumn: ..." under GX's MetricResolutionError); the message after it is never read.
    """
    info: Mapping[str, Any] = exception_info or {}
    for report in [info, *(v for v in info.values() if isinstance(v, Mapping))]:
        if not report.get("raised_exception"):
            continue
        lines = str(report.get("exception_traceback") or "").splitlines()
        starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
        for line in lines[starts[0] + 1 :] if starts else []:
            if line and not line[0].isspace():
                head = line.split(":", 1)[0]
                return head if _CLASS_NAME.fullmatch(head) else "Exception"
        return "Exception"
    return None


def _inet_columns(engine: Any, schema: str, tables: Iterable[str]) -> set[tuple[str, str]]:
    """(table, column) of inet/cidr columns: they compare through host(); IPs kept as text compare as they are."""
    import sqlalchemy as sa

    query = sa.text(
        "SELECT table_name, column_name FROM information_schema.columns "
        "WHERE table_schema = :schema AND table_name = ANY(:tables) AND data_type IN ('inet', 'cidr')"
    )
    with engine.connect() as connection:
        rows = connection.execute(query, {"schema": schema, "tables": list(tables)})
        return {(str(table), str(column)) for table, column in rows}


def _fetch_no_rows_of(engine: Any, queries: set[str]) -> None:
    """Make GX's bare run of a query asset's query fetch no rows.

    To learn a query asset's columns GX 1.24.1 executes the bare query once (column_reflection_fallback in
    great_expectations/expectations/metrics/util.py), and psycopg's client-side cursor fetches every row: the
    whole table, into memory. With LIMIT 0 it gets the same columns. Server-side cursors (stream_results) are no
    way out: GX fetches results after closing their connection. Only the exact bare statements are rewritten; the
    metric queries wrap them in a subquery.
    """
    from sqlalchemy import event

    def limit(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> Any:
        return (statement + " LIMIT 0" if statement.strip() in queries else statement), parameters

    event.listen(engine, "before_cursor_execute", limit, retval=True)


def _gx_run(
    suite: str,
    body: Callable[[Any], tuple[int, list[Failure]]],
    environment: dict[str, str],
    docs_dir: Path | None = None,
    docs: Iterable[DocsPage] = (),
) -> CheckResult:
    """Run `body` in a fresh context; `docs_dir` gives it a Data Docs site, `docs` the pages `body` built."""
    with _GX_LOCK, _quiet_gx():
        count, failures = body(_new_context(environment, docs_dir))
    return CheckResult(
        suite=suite, success=not failures, expectations=count, failures=tuple(failures), docs_pages=tuple(docs)
    )


# ---------------------------------------------------------------------------------------------------- public API
def erasure_checks(
    database_url: str,
    datamap: DataMap,
    subject: SubjectIdentifiers,
    s3_versions: pd.DataFrame,
    stripe_customers: pd.DataFrame,
) -> CheckResult:
    """Prove that none of the subject's identifiers is left in PostgreSQL, S3 or Stripe after an erasure.

    `s3_versions` lists every object version and delete marker left in the content bucket (key, version_id,
    is_delete_marker); `stripe_customers` the customers left (id, email, name, phone, deleted). Reads only.
    An expectation that cannot be evaluated (a mapped column missing from the database, say) is a failure with
    `error` set. Raises CheckError when a suite cannot run at all; a database that cannot be reached raises GX's
    TestConnectionError (its message names the server, no subject value is in play yet).
    """

    def body(context: Any) -> tuple[int, list[Failure]]:
        # The URL goes in as a config variable: GX's PostgresDsn rejects Unix-socket URLs (no host), and the
        # password stays out of the datasource's config.
        postgres = context.data_sources.add_postgres(
            "cellcms",
            connection_string="${" + _DATABASE_URL_VARIABLE + "}",
            kwargs={"hide_parameters": True},  # bound values stay out of SQLAlchemy's logs and exception messages
        )
        engine = postgres.get_execution_engine().engine  # the one validations run on (the datasource caches it)
        count, failures = 0, []
        try:
            schema = datamap.postgres.schema_
            plans = _postgres_plans(datamap, subject, _inet_columns(engine, schema, datamap.postgres.tables))
            bare_queries = {plan.query(schema) for plan in plans}
            _fetch_no_rows_of(engine, bare_queries)
            for plan in plans:
                asset = postgres.add_query_asset(plan.table, query=plan.query(schema))
                batch = asset.add_batch_definition_whole_table("all")
                found = _run_suite(context, f"erasure.{plan.table}", plan.table, batch, plan.specs)
                count += len(plan.specs)
                # LIKE also finds substrings ("10.0.0.1" in "10.0.0.15"): the regex decides for columns with hits.
                hits = [f.column for f in found if f.check == "mention" and f.error is None and f.column]
                if hits:
                    bare_queries.add(query := plan.text_query(schema, hits))
                    asset = postgres.add_query_asset(f"{plan.table}.mentions", query=query)
                    batch = asset.add_batch_definition_whole_table("all")
                    regex = {"regex": text_pattern(subject, flavor="postgres")}
                    specs = [_Spec("mention", c, "ExpectColumnValuesToNotMatchRegex", regex) for c in hits]
                    found = [f for f in found if f.column not in hits or f.check != "mention"]
                    found += _run_suite(context, f"erasure.{plan.table}.mentions", plan.table, batch, specs)
                failures += found
        finally:
            engine.dispose()  # every call builds its own engines: close their connections now, not at GC
            postgres.get_engine().dispose()
        listings = context.data_sources.add_pandas("listings")
        for asset, frame, specs in (
            ("s3_versions", s3_versions, _s3_specs(datamap, subject)),
            ("stripe_customers", _stripe_frame(stripe_customers), _stripe_specs(subject)),
        ):
            batch = listings.add_dataframe_asset(asset).add_batch_definition_whole_dataframe("all")
            failures += _run_suite(
                context, f"erasure.{asset}", asset, batch, specs, batch_parameters={"dataframe": frame}
            )
            count += len(specs)
        return count, failures

    return _gx_run("erasure", body, {_DATABASE_URL_VARIABLE: database_url})


def access_package_checks(manifest: pd.DataFrame, account_ids: set[int]) -> CheckResult:
    """Check an access package's manifest (table, category, account_id, rows): rows of the subject's accounts
    only (or of none, for mentions in others' data), known categories, non-negative row counts."""

    def body(context: Any) -> tuple[int, list[Failure]]:
        specs = _manifest_specs({int(a) for a in account_ids})
        batch = context.data_sources.add_pandas("package").add_dataframe_asset("manifest")
        batch = batch.add_batch_definition_whole_dataframe("all")
        return len(specs), _run_suite(
            context, "access_package.manifest", "manifest", batch, specs, batch_parameters={"dataframe": manifest}
        )

    return _gx_run("access_package", body, {})


def rights_package_checks(
    suite: str,
    manifest: pd.DataFrame,
    account_ids: set[int],
    *,
    subject_rows: pd.DataFrame,
    emails_on_file: set[str],
    email_owners: pd.DataFrame | None = None,
    window: pd.DataFrame | None = None,
    categories: pd.DataFrame | None = None,
) -> CheckResult:
    """Check a portability or right-to-know package, read back from S3, as frames that hold names and counts:

    - `manifest` (table, category, account_id, rows): as `access_package_checks`, rows of the person's accounts
      only;
    - `subject_rows` (account_id, email): the package holds the person's account rows, one per account, with the
      address on file (`emails_on_file`, compared lower-cased): their values, not someone else's;
    - `email_owners` (table, column, owner): no address in the package is another account's email on file;
    - `window` (table, rows_before_window): no row collected before the period disclosed (right to know);
    - `categories` (category, listed, described): every category the package holds rows of is listed in
      categories.json with its description, sources and purposes.
    """
    frames: list[tuple[str, pd.DataFrame, list[_Spec]]] = [
        ("manifest", manifest, _manifest_specs({int(a) for a in account_ids})),
        (
            "subject",
            subject_rows,
            [
                _Spec("subject_rows", None, "ExpectTableRowCountToEqual", {"value": len(account_ids)}),
                _Spec("subject_email", "email", "ExpectColumnValuesToNotBeNull"),
                _Spec(
                    "subject_email",
                    "email",
                    "ExpectColumnValuesToBeInSet",
                    {"value_set": sorted({e.lower() for e in emails_on_file})},
                ),
            ],
        ),
    ]
    if email_owners is not None:
        frames.append(
            (
                "emails",
                email_owners,
                [
                    _Spec(
                        "other_account_email",
                        "owner",
                        "ExpectColumnValuesToNotBeInSet",
                        {"value_set": ["other_account"]},
                    )
                ],
            )
        )
    if window is not None:
        frames.append(
            (
                "window",
                window,
                [
                    _Spec(
                        "collected_in_window",
                        "rows_before_window",
                        "ExpectColumnValuesToBeBetween",
                        {"max_value": 0},
                    )
                ],
            )
        )
    if categories is not None:
        frames.append(
            (
                "categories",
                categories,
                [
                    _Spec("category_listed", "listed", "ExpectColumnValuesToBeInSet", {"value_set": [True]}),
                    _Spec("category_described", "described", "ExpectColumnValuesToBeInSet", {"value_set": [True]}),
                ],
            )
        )

    def body(context: Any) -> tuple[int, list[Failure]]:
        source = context.data_sources.add_pandas("package")
        count, failures = 0, []
        for asset, frame, specs in frames:
            batch = source.add_dataframe_asset(asset).add_batch_definition_whole_dataframe("all")
            failures += _run_suite(
                context, f"{suite}.{asset}", asset, batch, specs, batch_parameters={"dataframe": frame}
            )
            count += len(specs)
        return count, failures

    return _gx_run(suite, body, {})


def _retention_plans(datamap: DataMap, rules: Iterable[str], as_of: Any) -> list[tuple[str, str, list[_Spec]]]:
    """(asset name, SQL, specs) per retention rule over PostgreSQL: built from the rule's own selection.

    - leftover: the rule's selection (what has expired, not held, not yet acted on) must be empty; each leftover
      row is one unexpected value, so the count says how many;
    - anonymised rows (anonymise_columns): every row past the clock, held ones excepted, has each column
      anonymised: IPs truncated (prefix length at most /24, /48), set_null columns null, redact_contacts columns
      free of email and IP addresses.
    The SQL carries dates and the rule's literals only, never a person's value.
    """
    from sqlalchemy import Text, bindparam, case, func, literal, select
    from sqlalchemy.dialects import postgresql

    from privacy_ops.datamap.model import Anonymiser, RetentionAction
    from privacy_ops.datamap.sql import table_clause
    from privacy_ops.retention import CONTACT_PATTERN, Clock, expired, ip_prefix, not_held_row, selection

    def sql(statement: Any) -> str:
        compiled = statement.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True})
        return str(compiled)

    clock = Clock(datamap, as_of)
    assert datamap.retention is not None
    plans: list[tuple[str, str, list[_Spec]]] = []
    for name in rules:
        rule = datamap.retention.rules[name]
        if rule.table is None:
            continue
        _, _, keys = selection(clock, rule)
        leftover = select(literal(1).label("leftover")).select_from(
            keys.params(contact_pattern=CONTACT_PATTERN).subquery()
        )
        plans.append(
            (f"{name}.leftover", sql(leftover), [_Spec("leftover", "leftover", "ExpectColumnValuesToBeNull")])
        )
        if rule.action == RetentionAction.anonymise_columns:
            target = table_clause(datamap, rule.table)
            columns: list[Any] = []
            specs: list[_Spec] = []
            for column, anonymiser in rule.columns.items():
                value = target.c[column]
                if anonymiser == Anonymiser.truncate_ip:
                    truncated = case((value.is_(None), True), else_=func.masklen(value) <= ip_prefix(value))
                    columns.append(truncated.label(column))
                    specs.append(_Spec("anonymised", column, "ExpectColumnValuesToBeInSet", {"value_set": [True]}))
                elif anonymiser == Anonymiser.set_null:
                    columns.append(value.label(column))
                    specs.append(_Spec("anonymised", column, "ExpectColumnValuesToBeNull"))
                else:
                    has_contact = func.coalesce(
                        value.op("~")(bindparam("pattern", CONTACT_PATTERN, type_=Text, literal_execute=True)),
                        False,
                    )
                    columns.append(has_contact.label(column))
                    specs.append(
                        _Spec("anonymised", column, "ExpectColumnValuesToBeInSet", {"value_set": [False]})
                    )
            spec = datamap.table(rule.table)
            past_clock = select(*columns).where(expired(clock, rule, target), not_held_row(clock, target, spec))
            plans.append((f"{name}.anonymised", sql(past_clock), specs))
    return plans


def retention_checks(
    database_url: str,
    datamap: DataMap,
    rules: Iterable[str],
    as_of: Any,
    s3_leftovers: pd.DataFrame | None = None,
    *,
    docs_dir: Path | None = None,
) -> CheckResult:
    """Prove that after a retention run nothing past its limit remains and anonymised rows hold no personal data.

    One suite per rule over PostgreSQL (see `_retention_plans`); `s3_leftovers` (column `folder`, one row per
    export folder past its period still holding a version) must be empty. Reads only; results carry names and
    counts, never values.

    With `docs_dir`, the validations also render GX Data Docs (HTML) there, one validation page per suite, listed
    in `CheckResult.docs_pages`. Safe to publish: these expectations carry dates and the rules' literals only, and
    samples are off, so the pages show suite, column and query text with counts. (The erasure suites hold the
    subject's values in their expectations and never render docs.)
    """
    plans = _retention_plans(datamap, list(rules), as_of)
    docs: list[DocsPage] = []
    if docs_dir is not None:
        docs_dir = Path(docs_dir).resolve()
        docs_dir.mkdir(parents=True, exist_ok=True)

    def body(context: Any) -> tuple[int, list[Failure]]:
        postgres = context.data_sources.add_postgres(
            "cellcms", connection_string="${" + _DATABASE_URL_VARIABLE + "}", kwargs={"hide_parameters": True}
        )
        engine = postgres.get_execution_engine().engine
        count, failures, suites = 0, [], []
        try:
            _fetch_no_rows_of(engine, {query for _, query, _ in plans})
            for asset_name, query, specs in plans:
                batch = postgres.add_query_asset(asset_name, query=query).add_batch_definition_whole_table("all")
                suites.append(f"retention.{asset_name}")
                failures += _run_suite(context, suites[-1], asset_name, batch, specs)
                count += len(specs)
        finally:
            engine.dispose()
            postgres.get_engine().dispose()
        if s3_leftovers is not None:
            specs = [_Spec("leftover", "folder", "ExpectColumnValuesToBeNull")]
            batch = context.data_sources.add_pandas("listings").add_dataframe_asset("s3_exports")
            batch = batch.add_batch_definition_whole_dataframe("all")
            suites.append("retention.s3_exports")
            failures += _run_suite(
                context, suites[-1], "s3_exports", batch, specs, batch_parameters={"dataframe": s3_leftovers}
            )
            count += len(specs)
        if docs_dir is not None:
            docs.extend(_build_docs(context, suites))
        return count, failures

    return _gx_run("retention", body, {_DATABASE_URL_VARIABLE: database_url}, docs_dir, docs)


def processing_checks(database_url: str, leftovers: Mapping[str, str]) -> CheckResult:
    """Prove a restriction or objection took effect: each query (processing.leftovers: account ids only, no
    personal data) must find no row, e.g. a restricted account in an analytics output or a marketing switch on."""

    def body(context: Any) -> tuple[int, list[Failure]]:
        postgres = context.data_sources.add_postgres(
            "cellcms", connection_string="${" + _DATABASE_URL_VARIABLE + "}", kwargs={"hide_parameters": True}
        )
        engine = postgres.get_execution_engine().engine
        failures: list[Failure] = []
        try:
            _fetch_no_rows_of(engine, set(leftovers.values()))
            for name, query in leftovers.items():
                batch = postgres.add_query_asset(name, query=query).add_batch_definition_whole_table("all")
                specs = [_Spec("leftover", None, "ExpectTableRowCountToEqual", {"value": 0})]
                failures += _run_suite(context, f"processing.{name}", name, batch, specs)
        finally:
            engine.dispose()
            postgres.get_engine().dispose()
        return len(leftovers), failures

    return _gx_run("processing", body, {_DATABASE_URL_VARIABLE: database_url})

"""Synthetic CellCMS rows: realistic people and their data, generated account by account, without any I/O.

`SyntheticCellCMS.build(first_id, last_id)` returns a `Chunk`: rows for every table of `cellcms_sandbox.schema`
(as tuples in `COLUMNS` order, ready for COPY), the S3 uploads to make and the Stripe customers to create. The
orchestration (`cellcms_sandbox.generator`) performs the uploads and Stripe calls, fills in the ids they return and
loads the rows.

Reproducible: every account draws from its own random stream seeded with (seed, account id), so an account's data
does not depend on chunk boundaries, on how many accounts are generated after it, or on the S3/Stripe caps. Row ids
are assigned sequentially, so the same parameters give the same rows, ids included.

Hard cases are planted on purpose (see `HARD_CASE_ACCOUNT_IDS` and `cellcms_sandbox.hard_cases`): a collaborator
authoring documents in another account's project, free text naming a person (email, full name, phone), referrers
carrying an IP address or `?email=`, error logs without an account that name a person and carry their IP, and
rows reachable only through foreign-key chains (support_messages, asset_versions).
"""

from __future__ import annotations

import base64
import bisect
import hashlib
import itertools
import json
import random
import unicodedata
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, TypeVar

from faker import Faker

# Column order of the tuples generated for each table; COPY names these columns explicitly.
# tests/test_sandbox.py checks that they are exactly the columns of cellcms_sandbox.schema.
COLUMNS: dict[str, tuple[str, ...]] = {
    "accounts": (
        "id", "email", "full_name", "password_hash", "phone", "birth_date", "is_minor_flagged", "plan",
        "created_at", "last_active_at", "deleted_at", "processing_restricted_at",
    ),
    "billing_profiles": (
        "account_id", "stripe_customer_id", "billing_name", "billing_email", "address_line1", "address_city",
        "address_postal_code", "address_country", "vat_number",
    ),
    "invoices": (
        "id", "account_id", "invoice_number", "stripe_invoice_id", "issued_at", "amount_cents", "tax_cents",
        "currency", "tax_country", "billing_name", "billing_email", "billing_address",
    ),
    "projects": ("id", "owner_account_id", "name", "created_at"),
    "project_members": ("project_id", "account_id", "role"),
    "documents": ("id", "project_id", "author_account_id", "title", "body", "created_at", "updated_at"),
    "content_schemas": ("id", "project_id", "name", "definition", "created_at"),
    "assets": ("id", "project_id", "filename", "content_type", "size_bytes", "s3_key", "created_at"),
    "asset_versions": ("id", "asset_id", "version_number", "s3_version_id", "uploaded_at", "uploader_ip"),
    "support_tickets": ("id", "account_id", "subject", "status", "created_at"),
    "support_messages": ("id", "ticket_id", "from_staff", "body", "sent_at"),
    "survey_responses": ("id", "account_id", "survey_name", "answers", "free_text", "submitted_at"),
    "page_views": ("id", "account_id", "path", "viewed_at", "session_id"),
    "feature_usage": ("id", "account_id", "feature", "used_at"),
    "api_call_counts": ("account_id", "day", "calls"),
    "devices": ("id", "account_id", "device_identifier", "browser", "os", "screen_resolution", "first_seen_at"),
    "access_logs": ("id", "account_id", "ip_address", "accessed_at", "method", "path", "status_code", "referrer"),
    "error_logs": ("id", "account_id", "occurred_at", "level", "message", "ip_address"),
    "cookie_consents": ("id", "account_id", "category", "granted", "recorded_at", "ip_address"),
    "preferences": ("account_id", "language", "theme", "timezone", "marketing_emails", "share_with_partners"),
    "processing_objections": ("id", "account_id", "purpose", "source", "objected_at"),
    "analytics_profiles": ("account_id", "segment", "computed_at"),
    "marketing_audience_members": ("audience", "account_id", "added_at"),
}  # fmt: skip

# Positions the orchestration fills in once S3 / Stripe have answered.
INVOICE_STRIPE_ID = COLUMNS["invoices"].index("stripe_invoice_id")
BILLING_STRIPE_ID = COLUMNS["billing_profiles"].index("stripe_customer_id")
VERSION_S3_ID = COLUMNS["asset_versions"].index("s3_version_id")

# Accounts 1..10 carry every hard case (see cellcms_sandbox.hard_cases); each is also a collaborator in the
# first project of account id + COLLABORATION_HOST_OFFSET, so that needs at least 20 accounts.
HARD_CASE_ACCOUNT_IDS = range(1, 11)
COLLABORATION_HOST_OFFSET = 10
# Population-level oddities, planted at fixed ids as well as at random elsewhere.
UNFLAGGED_MINOR_ACCOUNT_ID = 21  # under 16 by birth date, is_minor_flagged false
FLAGGED_MINOR_ACCOUNT_ID = 22
SOFT_DELETED_ACCOUNT_ID = 23  # deleted_at set, data still there
LONG_GONE_CUSTOMER_ACCOUNT_ID = 24  # former customer whose newest invoice is over 7 years old

# Collaborators are drawn from this many preceding accounts: keeps the identity cache bounded.
_WINDOW = 5000
_DAY = 86400.0
_MONTHS_7_YEARS = 84
_T = TypeVar("_T")
_from_ts = datetime.fromtimestamp

PAID_PLANS = ("pro", "business")
# Monthly price in the smallest currency unit.
PLAN_PRICES: dict[tuple[str, str], int] = {
    ("pro", "USD"): 1900, ("pro", "EUR"): 1900, ("pro", "GBP"): 1700, ("pro", "PLN"): 7900,
    ("business", "USD"): 4900, ("business", "EUR"): 4900, ("business", "GBP"): 4300, ("business", "PLN"): 19900,
}  # fmt: skip


@dataclass(frozen=True)
class Locale:
    faker_locale: str
    country: str
    currency: str
    vat_rate: float
    language: str
    timezone: str
    weight: int


LOCALES: tuple[Locale, ...] = (
    Locale("en_US", "US", "USD", 0.0, "en", "America/New_York", 30),
    Locale("de_DE", "DE", "EUR", 0.19, "de", "Europe/Berlin", 15),
    Locale("en_GB", "GB", "GBP", 0.20, "en", "Europe/London", 12),
    Locale("fr_FR", "FR", "EUR", 0.20, "fr", "Europe/Paris", 12),
    Locale("es_ES", "ES", "EUR", 0.21, "es", "Europe/Madrid", 8),
    Locale("nl_NL", "NL", "EUR", 0.21, "nl", "Europe/Amsterdam", 8),
    Locale("it_IT", "IT", "EUR", 0.22, "it", "Europe/Rome", 8),
    Locale("pl_PL", "PL", "PLN", 0.23, "pl", "Europe/Warsaw", 7),
)
_LOCALE_WEIGHTS = [locale.weight for locale in LOCALES]

# Reserved domains only (RFC 2606 / 6761): a sandbox email can never reach a real mailbox.
EMAIL_DOMAINS = ("example.com", "example.org", "example.net", "mail.example", "post.example", "inbox.test")

# Account IPs come from these /8 blocks (plausible public ranges); noise from the TEST-NETs, which no account
# ever gets, so an IP found in a log identifies at most one account.
_ACCOUNT_IP_BLOCKS = (
    24, 31, 37, 46, 50, 62, 66, 67, 68, 69, 70, 71, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 83, 84, 85, 86,
    87, 88, 89, 90, 91, 92, 93, 94, 95, 96, 97, 98, 99, 109, 176, 178, 185, 188, 193, 194, 195, 212, 213, 217,
)  # fmt: skip
_NOISE_IP_PREFIXES = ("192.0.2.", "198.51.100.", "203.0.113.")
_IP_SCRAMBLE = 0x2F6B4D  # odd: multiplying by it is a bijection modulo 2**24

_PROJECT_NAMES = (
    "Marketing site", "Company blog", "Docs portal", "Product catalog", "Landing pages", "Newsletter",
    "Intranet", "Help center", "Recipes", "Event site", "Careers page", "Podcast notes", "Knowledge base",
)  # fmt: skip
_SCHEMAS = {
    "Article": ["title:text", "slug:text", "body:richtext", "published_at:datetime", "tags:list"],
    "Author": ["name:text", "bio:richtext", "avatar:asset"],
    "Product": ["name:text", "sku:text", "price:decimal", "images:list"],
    "Event": ["title:text", "starts_at:datetime", "venue:text"],
    "Page": ["title:text", "path:text", "blocks:list"],
    "FAQ": ["question:text", "answer:richtext"],
}
_SCHEMA_NAMES = tuple(_SCHEMAS)
_SCHEMA_JSON = {
    name: json.dumps(
        {"fields": [{"name": f.split(":")[0], "type": f.split(":")[1]} for f in fields], "version": 1},
        separators=(",", ":"),
    )
    for name, fields in _SCHEMAS.items()
}
_ASSET_FILES = (
    ("logo.png", "image/png"), ("hero.jpg", "image/jpeg"), ("brochure.pdf", "application/pdf"),
    ("team-photo.jpg", "image/jpeg"), ("notes.md", "text/markdown"), ("price-list.csv", "text/csv"),
    ("banner.webp", "image/webp"),
)  # fmt: skip
_TICKET_SUBJECTS = (
    "Cannot upload images", "Question about my invoice", "Please delete my account", "Editor loses formatting",
    "Password reset email not arriving", "How do I invite a collaborator?", "API rate limit too low",
    "Custom domain not working", "Export my content", "Change billing address",
)  # fmt: skip
_TICKET_STATUSES = ("open", "pending", "closed", "closed", "closed")
_SURVEYS = ("nps-2025", "onboarding", "feature-requests-q3", "churn-exit")
_FEATURES = (
    "editor.autosave", "assets.upload", "schemas.edit", "api.tokens", "collab.invite", "export.csv",
    "preview.share", "ai.summarize", "webhooks.create", "domains.custom",
)  # fmt: skip
_APP_PATHS = (
    "/dashboard", "/projects", "/settings/profile", "/settings/security", "/billing", "/assets", "/help",
    "/api-keys", "/schemas", "/notifications",
)  # fmt: skip
_BROWSERS = ("Chrome 131", "Firefox 133", "Safari 18.1", "Edge 131", "Chrome Mobile 131", "Samsung Internet 26")
_OSES = ("Windows 11", "macOS 15", "iOS 18", "Android 15", "Ubuntu 24.04", "ChromeOS 130")
_SCREENS = ("1920x1080", "2560x1440", "1440x900", "390x844", "412x915", "1366x768", "3024x1964")
_SEARCH_REFERRERS = ("https://www.google.com/", "https://duckduckgo.com/", "https://www.bing.com/")
_STATUS_CODES = (200, 200, 200, 200, 200, 200, 302, 304, 401, 403, 404, 500)
_COOKIE_CATEGORIES = ("essential", "analytics", "preference")
_THEMES = ("light", "dark", "system")
_ANALYTICS_SEGMENTS = ("occasional", "regular", "power_user")
_ANONYMOUS_ERRORS = (
    "Login failed for {email}: invalid password",
    "Password reset requested for {email} (no session)",
    "Signup rejected: {email} already registered",
)


def _cumulative(*weights: float) -> tuple[float, ...]:
    total = sum(weights)
    return tuple(value / total for value in itertools.accumulate(weights))


# How many of each per account: index = count, value = cumulative probability.
_TICKETS_PER_ACCOUNT = _cumulative(45, 30, 15, 10)
_SURVEYS_PER_ACCOUNT = _cumulative(65, 28, 7)
_ERRORS_PER_ACCOUNT = _cumulative(55, 25, 12, 8)


@dataclass
class Person:
    """What later accounts need to know about an earlier one to collaborate with it (and name it in text)."""

    account_id: int
    email: str
    full_name: str
    first_name: str
    phone: str | None
    ips: tuple[str, ...]
    created: float  # epoch seconds
    project_ids: list[int]


@dataclass
class AssetUpload:
    """One S3 object with its versions, uploaded oldest first; the returned version ids go into `version_rows`."""

    key: str
    content_type: str
    versions: list[bytes]
    version_rows: list[int]  # indexes into the chunk's asset_versions rows, same order as `versions`


@dataclass
class StripeCustomer:
    """A paying account's Stripe customer with a subscription; its billing profile row waits for the ids."""

    account_id: int
    name: str
    email: str
    line1: str
    city: str
    postal_code: str
    country: str  # ISO 3166-1 alpha-2
    plan: str
    currency: str
    latest_invoice_row: int  # index into the chunk's invoice rows: gets the subscription's Stripe invoice id
    billing_profile: tuple[Any, ...]  # the billing_profiles row, with None as stripe_customer_id


@dataclass
class Chunk:
    rows: dict[str, list[tuple[Any, ...]]] = field(default_factory=lambda: {name: [] for name in COLUMNS})
    uploads: list[AssetUpload] = field(default_factory=list)
    customers: list[StripeCustomer] = field(default_factory=list)


def account_ip(seed: int, account_id: int, slot: int) -> str:
    """IPv4 address `slot` (0 or 1) of an account, never shared with another account (ids below 400 million)."""
    index = 2 * account_id + slot
    block = _ACCOUNT_IP_BLOCKS[index % len(_ACCOUNT_IP_BLOCKS)]
    # Bijective on 24 bits (odd multiplier, then xor), so distinct indexes never share an address.
    inner = ((index // len(_ACCOUNT_IP_BLOCKS)) * _IP_SCRAMBLE ^ (seed * 0x9E3779)) & 0xFFFFFF
    return f"{block}.{inner >> 16}.{(inner >> 8) & 0xFF}.{inner & 0xFF}"


def _ascii_slug(text: str) -> str:
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    return "".join(ch for ch in folded if ch.isalpha()) or "user"


def _scrambled_suffix(seed: int, account_id: int) -> str:
    # Unique per account (a bijection on 24 bits: ids below 16.7 million) without showing the account id in the
    # email address. Name-based prefixes hold no digits, so prefix + suffix stays unique too.
    return str(((account_id * 0x5BD1E9) ^ (seed & 0xFFFFFF)) & 0xFFFFFF)


class SyntheticCellCMS:
    """Generates CellCMS accounts and everything they own, chunk by chunk, in account id order."""

    def __init__(self, *, seed: int, now: datetime, s3_accounts: int, stripe_accounts: int) -> None:
        self.seed = seed
        self.now_ts = now.timestamp()
        self.today = now.date()
        self.s3_accounts = s3_accounts
        self.stripe_accounts = stripe_accounts
        self._rng = random.Random()
        self._random = self._rng.random
        self._fakers = {locale.faker_locale: Faker(locale.faker_locale) for locale in LOCALES}
        self._next_ids: dict[str, int] = defaultdict(lambda: 1)
        self._people: dict[int, Person] = {}
        # Shared text pools, drawn once per seed: per-row Faker calls would dominate the run time.
        pool = Faker("en_US")
        pool.seed_instance(seed)
        self._paragraphs = [pool.paragraph(nb_sentences=3) for _ in range(400)]
        self._sentences = [pool.sentence(nb_words=9) for _ in range(400)]
        self._titles = [pool.sentence(nb_words=4).rstrip(".") for _ in range(300)]

    def build(self, first_id: int, last_id: int) -> Chunk:
        """Rows for accounts first_id..last_id (inclusive); must be called in ascending, contiguous order."""
        chunk = Chunk()
        for account_id in range(first_id, last_id + 1):
            self._account(chunk, account_id)
            self._people.pop(account_id - _WINDOW, None)
        return chunk

    # --- helpers -------------------------------------------------------------------------------------------
    # Timestamps stay epoch seconds (floats) until they become row values, and `_pick`/`_randint` skip
    # random.choice's unbiasing loop: both ~3x cheaper, which matters at millions of rows.
    def _id(self, table: str) -> int:
        value = self._next_ids[table]
        self._next_ids[table] = value + 1
        return value

    def _between(self, start: float, end: float) -> datetime:
        return _from_ts(start + (end - start) * self._random(), UTC)

    def _ts_between(self, start: float, end: float) -> float:
        return start + (end - start) * self._random()

    def _pick(self, seq: Sequence[_T]) -> _T:
        return seq[int(self._random() * len(seq))]

    def _randint(self, low: int, high: int) -> int:
        return low + int(self._random() * (high - low + 1))

    def _weighted(self, cumulative: Sequence[float]) -> int:
        """Index drawn from cumulative probabilities (the last must be 1.0)."""
        return bisect.bisect_right(cumulative, self._random())

    def _body(self, paragraphs: int) -> str:
        return "\n\n".join(self._pick(self._paragraphs) for _ in range(paragraphs))

    # --- the account -----------------------------------------------------------------------------------------
    def _account(self, chunk: Chunk, account_id: int) -> None:
        rng = self._rng
        rng.seed((self.seed << 32) | account_id)
        locale = rng.choices(LOCALES, _LOCALE_WEIGHTS)[0]
        fake = self._fakers[locale.faker_locale]
        fake.seed_instance((self.seed << 32) | account_id)
        hard_case = account_id in HARD_CASE_ACCOUNT_IDS
        # Hosts of the hard cases' collaborations, and the long-gone customer, stay undeleted.
        keep = hard_case or account_id - COLLABORATION_HOST_OFFSET in HARD_CASE_ACCOUNT_IDS

        first_name, last_name = fake.first_name(), fake.last_name()
        full_name = f"{first_name} {last_name}"
        first_slug, last_slug = _ascii_slug(first_name), _ascii_slug(last_name)
        suffix = _scrambled_suffix(self.seed, account_id)
        local_part = self._pick(
            (f"{first_slug}.{last_slug}{suffix}", f"{first_slug[0]}{last_slug}{suffix}",
             f"{last_slug}.{first_slug}.{suffix}", f"{first_slug}{suffix}")
        )  # fmt: skip
        email = f"{local_part}@{self._pick(EMAIL_DOMAINS)}"
        phone = fake.phone_number() if hard_case or self._random() < 0.85 else None
        ips: tuple[str, ...] = (account_ip(self.seed, account_id, 0),)
        if self._random() < 0.4:
            ips += (account_ip(self.seed, account_id, 1),)

        long_gone = account_id == LONG_GONE_CUSTOMER_ACCOUNT_ID
        created = self.now_ts - rng.uniform(3500 if long_gone else 14, 3650) * _DAY
        deleted: float | None = None
        keep = keep or long_gone
        if account_id == SOFT_DELETED_ACCOUNT_ID or (not keep and self._random() < 0.04):
            deleted = self._ts_between(created + _DAY, self.now_ts)
        end = deleted or self.now_ts
        last_active_at = None if self._random() < 0.03 else self._between(end - (end - created) * 0.05, end)

        birth_date: date | None = None
        minor = False
        forced_minor = account_id in (UNFLAGGED_MINOR_ACCOUNT_ID, FLAGGED_MINOR_ACCOUNT_ID)
        if hard_case or forced_minor or self._random() < 0.65:
            minor = forced_minor or (not hard_case and self._random() < 0.03)
            age_years = rng.uniform(13.0, 15.9) if minor else rng.uniform(16.1, 80.0)
            birth_date = self.today - timedelta(days=age_years * 365.25)
        # Half of the under-16s slipped through without the flag: a hard case for age checks.
        minor_flagged = minor and self._random() < 0.5
        if forced_minor:
            minor_flagged = account_id == FLAGGED_MINOR_ACCOUNT_ID

        roll = self._random()
        plan = "free" if roll < 0.55 else "pro" if roll < 0.85 else "business"
        if hard_case or long_gone:
            plan = "business" if account_id % 3 == 0 else "pro"
        if minor:
            plan = "free"
        # Paying accounts need a real Stripe customer; beyond the Stripe cap (and when deleted) they are former
        # customers instead: free plan now, old invoices kept for tax law, no billing profile.
        active_customer = plan != "free" and deleted is None and account_id <= self.stripe_accounts
        former_customer = not minor and not active_customer and (plan != "free" or self._random() < 0.08)
        if long_gone:
            active_customer, former_customer = False, True

        password_hash = "$2b$12$" + base64.b64encode(rng.randbytes(40)).decode()[:53].replace("+", ".")
        chunk.rows["accounts"].append(
            (account_id, email, full_name, password_hash, phone, birth_date, minor_flagged,
             plan if active_customer else "free", _from_ts(created, UTC), last_active_at,
             None if deleted is None else _from_ts(deleted, UTC), None)
        )  # fmt: skip

        person = Person(account_id, email, full_name, first_name, phone, ips, created, [])
        self._people[account_id] = person
        self._projects(chunk, person, created, end, hard_case, last_name)
        self._collaborators(chunk, person, created, end)
        self._assets(chunk, person, created, end, hard_case, first_slug, last_slug)
        self._support(chunk, person, created, end, hard_case)
        self._surveys(chunk, person, created, end, hard_case)
        self._usage(chunk, person, created, end)
        self._devices_and_logs(chunk, person, created, end, hard_case)
        self._cookies_and_preferences(chunk, person, locale, created)
        if active_customer or former_customer:
            self._billing(chunk, person, fake, locale, plan, created, end, active_customer, hard_case, long_gone)

    # --- content ---------------------------------------------------------------------------------------------
    def _identity_mention(self, person: Person) -> str:
        """A sentence naming the person the way people do in free text."""
        options = [
            f"Contact: {person.full_name} <{person.email}>",
            f"Written by {person.full_name}.",
            f"Send corrections to {person.email}.",
        ]
        if person.phone:
            options.append(f"Questions? Call {person.first_name} on {person.phone}.")
        return self._pick(options)

    def _document(self, chunk: Chunk, project_id: int, author: Person, start: float, end: float, body: str,
                  title: str | None = None) -> None:  # fmt: skip
        created = self._ts_between(start, end)
        chunk.rows["documents"].append(
            (self._id("documents"), project_id, author.account_id, title or self._pick(self._titles), body,
             _from_ts(created, UTC), self._between(created, end))
        )  # fmt: skip

    def _projects(self, chunk: Chunk, person: Person, created: float, end: float, hard_case: bool,
                  last_name: str) -> None:  # fmt: skip
        for index in range(self._randint(1, 3)):
            project_id = self._id("projects")
            person.project_ids.append(project_id)
            project_created = created if index == 0 else self._ts_between(created, end)
            roll = self._random()
            if roll < 0.06:
                name = f"{person.full_name} Portfolio"
            elif roll < 0.10:
                name = f"The {last_name} family blog"
            else:
                name = self._pick(_PROJECT_NAMES)
            chunk.rows["projects"].append((project_id, person.account_id, name, _from_ts(project_created, UTC)))
            chunk.rows["project_members"].append((project_id, person.account_id, "owner"))
            for _ in range(self._randint(1, 2)):
                schema = self._pick(_SCHEMA_NAMES)
                chunk.rows["content_schemas"].append(
                    (self._id("content_schemas"), project_id, schema, _SCHEMA_JSON[schema],
                     self._between(project_created, end))
                )  # fmt: skip
            for doc_index in range(self._randint(1, 5)):
                body = self._body(self._randint(1, 3))
                if hard_case and index == 0 and doc_index == 0:
                    body += f"\n\nContact: {person.full_name} <{person.email}>"
                elif self._random() < 0.12:
                    body += "\n\n" + self._identity_mention(person)
                title = f"Interview with {person.full_name}" if self._random() < 0.04 else None
                self._document(chunk, project_id, person, project_created, end, body, title)

    def _collaborators(self, chunk: Chunk, host: Person, created: float, end: float) -> None:
        """Earlier accounts invited into this account's projects, some authoring documents there."""
        guests: list[tuple[Person, bool]] = []  # (collaborator, is the planted hard case)
        forced = host.account_id - COLLABORATION_HOST_OFFSET
        if forced in HARD_CASE_ACCOUNT_IDS and forced in self._people:
            guests.append((self._people[forced], True))
        if host.account_id > 1 and self._random() < 0.22:
            candidate = self._randint(max(1, host.account_id - _WINDOW), host.account_id - 1)
            if candidate in self._people and candidate != forced:
                guests.append((self._people[candidate], False))
        for guest, hard_case in guests:
            start = max(created, guest.created)  # nobody writes before their account exists
            if start >= end:
                continue
            project_id = host.project_ids[0] if hard_case else self._pick(host.project_ids)
            role = "editor" if hard_case or self._random() < 0.7 else "viewer"
            chunk.rows["project_members"].append((project_id, guest.account_id, role))
            if role != "editor":
                continue
            for doc_index in range(2 if hard_case else self._randint(1, 2)):
                body = self._body(self._randint(1, 2))
                if (hard_case and doc_index == 0) or self._random() < 0.3:
                    body += f"\n\nDraft by {guest.full_name} ({guest.email})"
                self._document(chunk, project_id, guest, start, end, body)
            # The host's own text names the collaborator: erasing the guest must redact the host's document.
            if hard_case or self._random() < 0.3:
                phone = f", phone {guest.phone}" if guest.phone else ""
                body = self._body(1) + f"\n\nReviewed by {guest.full_name}{phone}."
                self._document(chunk, project_id, host, start, end, body)

    def _assets(self, chunk: Chunk, person: Person, created: float, end: float, hard_case: bool,
                first_slug: str, last_slug: str) -> None:  # fmt: skip
        upload = person.account_id <= self.s3_accounts
        versions_rows = chunk.rows["asset_versions"]
        for index in range(self._randint(1, 3)):
            asset_id = self._id("assets")
            project_id = self._pick(person.project_ids)
            roll = self._random()
            if roll < 0.1:
                filename, content_type = f"cv-{first_slug}-{last_slug}.pdf", "application/pdf"
            elif roll < 0.18:
                filename, content_type = f"{last_slug}-headshot.jpg", "image/jpeg"
            else:
                filename, content_type = self._pick(_ASSET_FILES)
            key = f"accounts/{person.account_id}/assets/{asset_id}/{filename}"
            asset_created = self._ts_between(created, end)
            uploaded = asset_created
            contents: list[bytes] = []
            version_rows: list[int] = []
            for number in range(1, (2 if hard_case and index == 0 else self._randint(1, 3)) + 1):
                if number > 1:
                    uploaded = self._ts_between(uploaded, end)
                # Drawn whether or not it is uploaded, so the S3 cap does not shift the rest of the random stream.
                padding = self._randint(16, 200)
                if upload:
                    filler = hashlib.sha256(f"{self.seed}/{asset_id}/{number}".encode()).hexdigest() * 7
                    contents.append(
                        f"CellCMS sandbox asset {filename}, version {number}\nUploaded by {person.full_name}\n"
                        f"{filler[:padding]}\n".encode()
                    )
                version_rows.append(len(versions_rows))
                versions_rows.append(
                    (self._id("asset_versions"), asset_id, number, None, _from_ts(uploaded, UTC),
                     self._pick(person.ips))
                )  # fmt: skip
            # Beyond the S3 cap no object exists: the size is only plausible, and s3_version_id stays NULL.
            plausible_size = self._randint(2_000, 5_000_000)
            size = len(contents[-1]) if upload else plausible_size
            chunk.rows["assets"].append(
                (asset_id, project_id, filename, content_type, size, key, _from_ts(asset_created, UTC))
            )
            if upload:
                chunk.uploads.append(AssetUpload(key, content_type, contents, version_rows))

    # --- communications --------------------------------------------------------------------------------------
    def _support(self, chunk: Chunk, person: Person, created: float, end: float, hard_case: bool) -> None:
        tickets = self._weighted(_TICKETS_PER_ACCOUNT)
        for index in range(max(tickets, 1) if hard_case else tickets):
            ticket_id = self._id("support_tickets")
            opened = self._ts_between(created, end)
            subject = self._pick(_TICKET_SUBJECTS)
            if self._random() < 0.05:
                subject = f"Login problem for {person.email}"
            chunk.rows["support_tickets"].append(
                (ticket_id, person.account_id, subject, self._pick(_TICKET_STATUSES), _from_ts(opened, UTC))
            )
            sent = opened
            messages = self._randint(1, 4)
            for number in range(max(2, messages) if hard_case else messages):
                from_staff = number % 2 == 1
                if from_staff:
                    reply = self._pick(self._sentences)
                    body = f"Hi {person.first_name},\n\n{reply}\n\nBest regards,\nCellCMS Support"
                else:
                    body = f"{self._pick(self._sentences)} {self._pick(self._sentences)}"
                    if (hard_case and index == 0 and number == 0) or self._random() < 0.2:
                        body += f"\n\nMy login email is {person.email}."
                        if person.phone:
                            body += f" You can reach me on {person.phone}."
                    body += f"\n\nThanks,\n{person.full_name}"
                chunk.rows["support_messages"].append(
                    (self._id("support_messages"), ticket_id, from_staff, body, _from_ts(sent, UTC))
                )
                sent = self._ts_between(sent, min(end, sent + 3 * _DAY))

    def _surveys(self, chunk: Chunk, person: Person, created: float, end: float, hard_case: bool) -> None:
        for index in range(1 if hard_case else self._weighted(_SURVEYS_PER_ACCOUNT)):
            score = self._randint(0, 10)
            answers = json.dumps({"score": score, "would_recommend": score >= 7, "uses_api": self._random() < 0.3})
            free_text: str | None = None
            if (hard_case and index == 0) or self._random() < 0.15:
                free_text = (
                    f"{self._pick(self._sentences)} Feel free to follow up: {person.full_name}, {person.email}"
                )
            elif self._random() < 0.5:
                free_text = self._pick(self._sentences)
            chunk.rows["survey_responses"].append(
                (self._id("survey_responses"), person.account_id, self._pick(_SURVEYS), answers, free_text,
                 self._between(created, end))
            )  # fmt: skip

    # --- usage, devices, logs ----------------------------------------------------------------------------------
    def _usage(self, chunk: Chunk, person: Person, created: float, end: float) -> None:
        account_id = person.account_id
        recent = max(created, end - 400 * _DAY)
        sessions = [f"{self._rng.getrandbits(128):032x}" for _ in range(self._randint(1, 5))]
        page_views = chunk.rows["page_views"]
        for _ in range(self._randint(10, 30)):
            path = self._pick(_APP_PATHS)
            if path == "/projects":
                path = f"/projects/{self._pick(person.project_ids)}"
            page_views.append(
                (self._id("page_views"), account_id, path, self._between(recent, end), self._pick(sessions))
            )
        feature_usage = chunk.rows["feature_usage"]
        for _ in range(self._randint(3, 15)):
            feature_usage.append(
                (self._id("feature_usage"), account_id, self._pick(_FEATURES), self._between(recent, end))
            )
        if self._random() < 0.35:
            last_day = _from_ts(end, UTC).date()
            span = max(0, min(90, (last_day - _from_ts(created, UTC).date()).days))
            for offset in sorted(self._rng.sample(range(span + 1), min(span + 1, self._randint(1, 20)))):
                chunk.rows["api_call_counts"].append(
                    (account_id, last_day - timedelta(days=offset), self._randint(1, 5000))
                )

    def _devices_and_logs(self, chunk: Chunk, person: Person, created: float, end: float, hard_case: bool) -> None:
        account_id = person.account_id
        for _ in range(self._randint(1, 3)):
            hex_id = f"{self._rng.getrandbits(128):032x}"
            chunk.rows["devices"].append(
                (self._id("devices"), account_id,
                 f"{hex_id[:8]}-{hex_id[8:12]}-{hex_id[12:16]}-{hex_id[16:20]}-{hex_id[20:]}",
                 self._pick(_BROWSERS), self._pick(_OSES), self._pick(_SCREENS), self._between(created, end))
            )  # fmt: skip

        # Mostly recent logs, some older than any sensible retention period.
        recent = max(created, end - 120 * _DAY)
        old = max(created, end - 900 * _DAY)
        access_logs = chunk.rows["access_logs"]
        for index in range(self._randint(5, 20)):
            roll = self._random()
            # Hard cases: the first two rows carry an IP address and the email in their referrer.
            if hard_case and index < 2:
                referrer: str | None = (
                    f"http://{person.ips[0]}:8080/preview"
                    if index == 0
                    else f"https://app.cellcms.com/login?email={person.email}"
                )
            elif roll < 0.02:  # per row: about one account in five has such a referrer somewhere
                referrer = f"http://{person.ips[0]}:8080/preview"
            elif roll < 0.04:
                referrer = f"https://app.cellcms.com/login?email={person.email}"
            elif roll < 0.45:
                referrer = None
            elif roll < 0.65:
                referrer = self._pick(_SEARCH_REFERRERS)
            else:
                referrer = f"https://app.cellcms.com/projects/{self._pick(person.project_ids)}"
            access_logs.append(
                (self._id("access_logs"), account_id, self._pick(person.ips),
                 self._between(old if self._random() < 0.15 else recent, end),
                 "POST" if self._random() < 0.2 else "GET", self._pick(_APP_PATHS), self._pick(_STATUS_CODES),
                 referrer)
            )  # fmt: skip

        error_logs = chunk.rows["error_logs"]
        errors = self._weighted(_ERRORS_PER_ACCOUNT)
        for index in range(max(1, errors) if hard_case else errors):
            roll = self._random()
            ip: str | None = self._pick(person.ips) if self._random() < 0.7 else None
            if (hard_case and index == 0) or roll < 0.25:
                message = f"Email delivery to {person.email} bounced (550 mailbox unavailable)"
            elif roll < 0.45:
                ip = self._pick(person.ips)
                message = f"Rate limit exceeded for {ip} (120 requests/min)"
            elif roll < 0.7:
                message = f"Upload of asset {self._randint(1, 10**6)} failed: S3 timeout after 30s"
            else:
                message = f"Render error in document {self._randint(1, 10**6)}: unexpected token"
            error_logs.append(
                (self._id("error_logs"), account_id, self._between(recent, end), self._pick(("ERROR", "WARNING")),
                 message, ip)
            )  # fmt: skip
        # Before login the application does not know the account: account_id is NULL, yet the email and the IP
        # identify the person.
        for _ in range(2 if hard_case else 1 if self._random() < 0.12 else 0):
            message = self._pick(_ANONYMOUS_ERRORS).format(email=person.email)
            error_logs.append(
                (self._id("error_logs"), None, self._between(recent, end), "WARNING", message, person.ips[0])
            )
        # Noise nobody owns: bots from TEST-NET addresses.
        if self._random() < 0.3:
            noise_ip = f"{self._pick(_NOISE_IP_PREFIXES)}{self._randint(1, 254)}"
            error_logs.append(
                (self._id("error_logs"), None, self._between(recent, end), "WARNING",
                 f"Blocked request to /wp-login.php from {noise_ip}", noise_ip)
            )  # fmt: skip

    def _cookies_and_preferences(self, chunk: Chunk, person: Person, locale: Locale, created: float) -> None:
        analytics_granted = False
        for category in _COOKIE_CATEGORIES:
            granted = category == "essential" or self._random() < 0.55
            analytics_granted = analytics_granted or (category == "analytics" and granted)
            chunk.rows["cookie_consents"].append(
                (self._id("cookie_consents"), person.account_id, category, granted,
                 self._between(created, created + 600), person.ips[0])
            )  # fmt: skip
        language = locale.language if self._random() < 0.8 else "en"
        marketing_emails = self._random() < 0.3
        chunk.rows["preferences"].append(
            (person.account_id, language, self._pick(_THEMES), locale.timezone, marketing_emails, False)
        )
        # The processing outputs of those choices (no random draws: the rest of the data stays as it was).
        computed_at = _from_ts(self.now_ts - _DAY, UTC)
        if analytics_granted:
            segment = _ANALYTICS_SEGMENTS[person.account_id % len(_ANALYTICS_SEGMENTS)]
            chunk.rows["analytics_profiles"].append((person.account_id, segment, computed_at))
        if marketing_emails:
            chunk.rows["marketing_audience_members"].append(("newsletter", person.account_id, computed_at))

    # --- billing -----------------------------------------------------------------------------------------------
    def _billing(self, chunk: Chunk, person: Person, fake: Faker, locale: Locale, plan: str, created: float,
                 end: float, active_customer: bool, hard_case: bool, long_gone: bool) -> None:  # fmt: skip
        business = plan == "business" or self._random() < 0.25
        company = fake.company() if business else None
        billing_name = company or person.full_name
        billing_email = person.email
        if company and self._random() < 0.5:
            billing_email = (
                f"billing+{_scrambled_suffix(self.seed, person.account_id)}@{_ascii_slug(company)}.example"
            )
        line1, city, postal_code = fake.street_address().replace("\n", ", "), fake.city(), fake.postcode()
        vat_number = None
        if business and locale.country != "US":
            vat_number = f"{locale.country}{self._randint(10**8, 10**9 - 1)}"
        billing_address = f"{line1}, {postal_code} {city}, {locale.country}"

        # Monthly invoices, newest first: up to this month for customers; for former customers ending months or
        # years ago (some before the 7-year tax retention period, so retention has something to purge).
        created_day, end_day = _from_ts(created, UTC).date(), _from_ts(end, UTC).date()
        months_alive = max(1, (end_day.year - created_day.year) * 12 + end_day.month - created_day.month)
        ended_months_ago = 0 if active_customer else self._randint(0, months_alive - 1)
        if long_gone:  # the last invoice is over 7 years old: retention must purge all of them
            ended_months_ago = self._randint(min(_MONTHS_7_YEARS + 1, months_alive - 1), months_alive - 1)
        wanted = self._randint(3, 12) if hard_case else self._randint(1, 12)
        count = max(1, min(wanted, months_alive - ended_months_ago))
        price_plan = plan if plan in PAID_PLANS else self._pick(PAID_PLANS)
        amount = PLAN_PRICES[(price_plan, locale.currency)]
        tax = round(amount * locale.vat_rate)
        invoices = chunk.rows["invoices"]
        newest_row = len(invoices)
        for months_ago in range(ended_months_ago, ended_months_ago + count):
            year, month_index = divmod(end_day.year * 12 + end_day.month - 1 - months_ago, 12)
            issued = date(year, month_index + 1, 1)
            invoice_id = self._id("invoices")
            invoices.append(
                (invoice_id, person.account_id, f"CC-{issued.year}-{invoice_id:08d}", None, issued, amount, tax,
                 locale.currency, locale.country, billing_name, billing_email, billing_address)
            )  # fmt: skip
        if not active_customer:
            return
        profile = (person.account_id, None, billing_name, billing_email, line1, city, postal_code, locale.country,
                   vat_number)  # fmt: skip
        chunk.customers.append(
            StripeCustomer(
                account_id=person.account_id, name=billing_name, email=billing_email, line1=line1, city=city,
                postal_code=postal_code, country=locale.country, plan=plan, currency=locale.currency,
                latest_invoice_row=newest_row, billing_profile=profile,
            )
        )  # fmt: skip


def with_field(row: tuple[Any, ...], position: int, value: Any) -> tuple[Any, ...]:
    """A copy of the row with one field replaced (rows are tuples: cheap to build, immutable to use)."""
    return (*row[:position], value, *row[position + 1 :])


def replace_field(rows: list[tuple[Any, ...]], index: int, position: int, value: Any) -> None:
    """Set one field of one generated row in place."""
    rows[index] = with_field(rows[index], position, value)

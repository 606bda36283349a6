"""Seeding the sandbox CellCMS: PostgreSQL rows via COPY, asset versions in S3, customers in Stripe.

`seed_sandbox()` is what `privacy-ops seed` calls. It migrates the schema, then runs a two-stage pipeline:

- a background thread generates accounts chunk by chunk (memory stays bounded whatever the account count),
  uploads the chunk's asset versions to S3 (thread pool) while creating its Stripe customers, and fills the ids
  those services return into the rows;
- the calling thread COPYs each finished chunk into PostgreSQL, so Python generation and PostgreSQL ingestion
  overlap.

The whole load is one transaction: the sandbox tables' foreign keys and secondary indexes are dropped at its start
and recreated (identically, from their own definitions) at its end, which halves PostgreSQL's work compared with
checking and indexing row by row. A failure rolls everything back, and the run's S3 objects and Stripe customers
are deleted again (best effort).

Only the first accounts get real S3 objects and Stripe customers: moto answers ~100-300 requests/s, and localstripe
slows down as its store grows (every write builds an event that scans the whole store), so 100,000 customers would
take hours. See `seed_sandbox` for the caps.
"""

from __future__ import annotations

import contextlib
import queue
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

import psycopg
import stripe
from psycopg import sql
from tqdm import tqdm

from cellcms_sandbox import s3_assets
from cellcms_sandbox.database import TABLE_NAMES, migrate, psycopg_conninfo
from cellcms_sandbox.stripe_billing import StripeSeeder, delete_customers
from cellcms_sandbox.synthetic import (
    BILLING_STRIPE_ID,
    COLUMNS,
    INVOICE_STRIPE_ID,
    VERSION_S3_ID,
    Chunk,
    SyntheticCellCMS,
    replace_field,
    with_field,
)

# Accounts 1..N get real objects / customers; later accounts get none (see seed_sandbox).
DEFAULT_S3_ACCOUNTS = 500
DEFAULT_STRIPE_ACCOUNTS = 300

# Small chunks while S3/Stripe are involved, so the progress bar moves; larger ones for the pure-SQL rest.
# About 80 rows per account: a 1,000-account chunk is ~80,000 tuples, ~40 MB; at most 4 chunks are alive.
_EXTERNAL_CHUNK = 50
_CHUNK = 1000
_PREFETCH_DEPTH = 2

T = TypeVar("T")


class SandboxNotEmptyError(RuntimeError):
    """The database (or the bucket) already holds sandbox data; seeding again needs reset=True."""


@dataclass
class SeedReport:
    """What one seeding run created, and how long it took."""

    accounts: int
    seed: int
    rows: dict[str, int]
    s3_accounts: int  # accounts 1..s3_accounts had their asset versions uploaded
    s3_object_versions: int
    stripe_accounts: int  # paying accounts among 1..stripe_accounts have a Stripe customer
    stripe_customers: int
    stripe_invoices_linked: int
    seconds: float
    # Busy time per stage. generate/stripe/s3 run in the background thread while copy runs in the caller's,
    # so they overlap and add up to more than `seconds`.
    timings: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        """One line for people: what was seeded, how fast."""
        return (
            f"seeded {self.accounts:,} accounts: {self.total_rows:,} rows ({self.rows_per_second:,.0f} rows/s), "
            f"{self.s3_object_versions:,} S3 object versions, {self.stripe_customers:,} Stripe customers "
            f"in {self.seconds:.1f} s"
        )

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())

    @property
    def rows_per_second(self) -> float:
        return self.total_rows / self.seconds if self.seconds else 0.0


# --- the producing stage ---------------------------------------------------------------------------------------
@dataclass
class _Producer:
    """Generates chunks and makes their S3 objects and Stripe customers (runs in the background thread)."""

    generator: SyntheticCellCMS
    accounts: int
    external_until: int
    s3_client: Any | None
    bucket: str
    stripe: StripeSeeder | None
    pool: ThreadPoolExecutor
    timings: dict[str, float]
    created_customers: list[str] = field(default_factory=list)  # for the cleanup after a failure
    s3_versions: int = 0
    stripe_invoices: int = 0

    def chunks(self) -> Iterator[tuple[int, Chunk]]:
        """(accounts in the chunk, chunk with every external id filled in), in account order."""
        first = 1
        while first <= self.accounts:
            size = _EXTERNAL_CHUNK if first <= self.external_until else _CHUNK
            last = min(self.accounts, first + size - 1)
            mark = time.perf_counter()
            chunk = self.generator.build(first, last)
            self.timings["generate"] += time.perf_counter() - mark
            if chunk.uploads or chunk.customers:
                self._external(chunk)
            yield last - first + 1, chunk
            first = last + 1

    def _external(self, chunk: Chunk) -> None:
        mark = time.perf_counter()
        # The pool uploads while this thread talks to Stripe.
        uploads = (
            s3_assets.start_uploads(self.s3_client, self.bucket, chunk.uploads, self.pool) if chunk.uploads else []
        )
        for customer in chunk.customers:
            assert self.stripe is not None  # customers are only generated below a non-zero Stripe cap
            customer_id, invoice_id = self.stripe.create_customer(customer)
            self.created_customers.append(customer_id)
            chunk.rows["billing_profiles"].append(
                with_field(customer.billing_profile, BILLING_STRIPE_ID, customer_id)
            )
            if invoice_id:
                replace_field(chunk.rows["invoices"], customer.latest_invoice_row, INVOICE_STRIPE_ID, invoice_id)
                self.stripe_invoices += 1
        self.timings["stripe"] += time.perf_counter() - mark
        mark = time.perf_counter()
        for upload, future in zip(chunk.uploads, uploads, strict=True):
            for row_index, version_id in zip(upload.version_rows, future.result(), strict=True):
                replace_field(chunk.rows["asset_versions"], row_index, VERSION_S3_ID, version_id)
                self.s3_versions += 1
        self.timings["s3"] += time.perf_counter() - mark


@dataclass
class _Failure:
    error: BaseException


class _Prefetch(Generic[T]):
    """Runs an iterator in a background thread, at most `depth` items ahead of the consumer.

    An exception in the iterator is re-raised in the consumer; `close()` stops the thread after its current item.
    """

    _DONE = object()

    def __init__(self, items: Iterator[T], depth: int) -> None:
        self._queue: queue.Queue[object] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(items,), name="cellcms-sandbox-producer")
        self._thread.start()

    def _run(self, items: Iterator[T]) -> None:
        try:
            for item in items:
                if not self._put(item):
                    return
            self._put(self._DONE)
        except BaseException as error:  # handed to the consumer, which re-raises it
            self._put(_Failure(error))

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[T]:
        while True:
            item = self._queue.get()
            if item is self._DONE:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item  # type: ignore[misc]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


# --- PostgreSQL ------------------------------------------------------------------------------------------------
def _sandbox_tables_with_rows(connection: psycopg.Connection[Any]) -> list[str]:
    query = sql.SQL(" UNION ALL ").join(
        sql.SQL("SELECT {name} WHERE EXISTS (SELECT 1 FROM {table})").format(
            name=sql.Literal(name), table=sql.Identifier(name)
        )
        for name in TABLE_NAMES
    )
    return [row[0] for row in connection.execute(query).fetchall()]


@contextlib.contextmanager
def _constraints_deferred(connection: psycopg.Connection[Any]) -> Iterator[None]:
    """Drop the sandbox tables' foreign keys and secondary indexes, and recreate them from their own definitions
    afterwards: validating and indexing once at the end is about twice as cheap as doing it row by row.

    Must run inside a transaction: if the load fails, the rollback restores them untouched. Primary keys and
    unique constraints stay, so a generator bug producing duplicates still fails the load.
    """
    tables = list(TABLE_NAMES)
    foreign_keys = connection.execute(
        """SELECT c.conrelid::regclass::text, c.conname, pg_get_constraintdef(c.oid)
           FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid
           WHERE c.contype = 'f' AND t.relnamespace = 'public'::regnamespace AND t.relname = ANY(%s)""",
        (tables,),
    ).fetchall()
    indexes = connection.execute(
        """SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid)
           FROM pg_index i JOIN pg_class t ON t.oid = i.indrelid
           WHERE t.relnamespace = 'public'::regnamespace AND t.relname = ANY(%s)
             AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid)""",
        (tables,),
    ).fetchall()
    for table, name, _ in foreign_keys:
        connection.execute(
            sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(sql.SQL(table), sql.Identifier(name))
        )
    for name, _ in indexes:
        connection.execute(sql.SQL("DROP INDEX {}").format(sql.SQL(name)))
    yield
    for _, definition in indexes:
        connection.execute(sql.SQL(definition))  # pg_get_indexdef gives the whole CREATE INDEX statement
    for table, name, definition in foreign_keys:
        connection.execute(
            sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
                sql.SQL(table), sql.Identifier(name), sql.SQL(definition)
            )
        )


def _copy_chunk(cursor: psycopg.Cursor[Any], chunk: Chunk) -> None:
    for table in TABLE_NAMES:
        rows = chunk.rows[table]
        if not rows:
            continue
        statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
            sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, COLUMNS[table]))
        )
        with cursor.copy(statement) as copy:
            for row in rows:
                copy.write_row(row)


def _set_sequences(connection: psycopg.Connection[Any]) -> None:
    """Point every id sequence past the explicit ids, so that later inserts (tests, the app) get fresh ids."""
    for table in TABLE_NAMES:
        if "id" in COLUMNS[table]:
            connection.execute(
                sql.SQL(
                    "SELECT setval(pg_get_serial_sequence({name}, 'id'), COALESCE(MAX(id), 0) + 1, false)"
                    " FROM {table}"
                ).format(name=sql.Literal(f"public.{table}"), table=sql.Identifier(table))
            )


def _reset(
    connection: psycopg.Connection[Any], s3_client: Any | None, stripe_client: stripe.StripeClient | None,
    content_bucket: str,
) -> None:  # fmt: skip
    """Remove what an earlier run created: its Stripe customers, its S3 objects, then every sandbox row."""
    if stripe_client is not None:
        customer_ids = [row[0] for row in connection.execute("SELECT stripe_customer_id FROM billing_profiles")]
        delete_customers(stripe_client, customer_ids)
    if s3_client is not None and _bucket_exists(s3_client, content_bucket):
        s3_assets.delete_all_versions(s3_client, content_bucket)
    # Only the sandbox's own tables: privacy_ops keeps its records in its own schema and is left alone.
    connection.execute(
        sql.SQL("TRUNCATE {} RESTART IDENTITY").format(sql.SQL(", ").join(map(sql.Identifier, TABLE_NAMES)))
    )


def _bucket_exists(s3_client: Any, bucket: str) -> bool:
    try:
        s3_client.head_bucket(Bucket=bucket)
    except s3_client.exceptions.ClientError:
        return False
    return True


def _cleanup_after_failure(
    producer: _Producer, s3_client: Any | None, stripe_client: stripe.StripeClient | None, bucket: str
) -> None:
    """Best effort: the database rolled back, so the run's objects and customers would point at nothing."""
    with contextlib.suppress(Exception):
        if stripe_client is not None and producer.created_customers:
            delete_customers(stripe_client, producer.created_customers)
    with contextlib.suppress(Exception):
        if s3_client is not None:
            # The bucket had nothing under accounts/ when the run started: all of it is this run's.
            s3_assets.delete_all_versions(s3_client, bucket)


# --- the entry point -------------------------------------------------------------------------------------------
def seed_sandbox(
    database_url: str,
    s3_client: Any | None,
    stripe_client: stripe.StripeClient | None,
    content_bucket: str,
    accounts: int,
    *,
    seed: int = 42,
    s3_accounts: int | None = None,
    stripe_accounts: int | None = None,
    reset: bool = False,
    progress: bool = True,
    now: datetime | None = None,
    upload_workers: int = 8,
) -> SeedReport:
    """Fill an empty sandbox CellCMS with `accounts` synthetic accounts and everything they own.

    Same seed (and same `now`) → same data: emails, names, texts, dates and row ids. `now` defaults to today's
    midnight UTC, so runs on the same day agree; every date in the data is relative to it.

    S3: accounts 1..`s3_accounts` (default `DEFAULT_S3_ACCOUNTS` = 500: ~1,000 assets, ~2,000 object versions,
    10-20 s against moto) have their asset versions uploaded to `content_bucket` (created, versioned, if
    missing); later accounts keep their assets rows, with `s3_version_id` NULL and no object. No `s3_client` → no
    uploads at all.

    Stripe: paying accounts among 1..`stripe_accounts` (default `DEFAULT_STRIPE_ACCOUNTS` = 300: ~130 customers,
    5-20 s against localstripe, whose cost per call grows with its store) get a customer with a card and a
    subscription; their billing profile holds the real customer id and their newest invoice the subscription's
    invoice id, so every billing_profiles row names a customer that exists. Later paying accounts become former
    customers instead: plan "free", invoices kept (tax law), no billing profile. No `stripe_client` → no billing
    profiles at all.

    Hard cases: accounts 1..10 carry all of them (given at least 20 accounts and both caps at least 10), and
    they recur at random through the rest; `cellcms_sandbox.hard_cases.demo_subjects` finds them.

    Raises SandboxNotEmptyError when sandbox rows (or objects under `accounts/` in the bucket) exist, unless
    `reset=True`, which first deletes the previous run's Stripe customers (those in billing_profiles), every
    object version under `accounts/` and every sandbox row. Progress goes to stderr (tqdm); nothing is printed.
    """
    if accounts < 1:
        raise ValueError("accounts must be at least 1")
    started = time.perf_counter()
    s3_cap = 0 if s3_client is None else min(accounts, DEFAULT_S3_ACCOUNTS if s3_accounts is None else s3_accounts)
    stripe_cap = 0 if stripe_client is None else min(
        accounts, DEFAULT_STRIPE_ACCOUNTS if stripe_accounts is None else stripe_accounts
    )  # fmt: skip
    timings = dict.fromkeys(("migrate", "generate", "stripe", "s3", "copy", "finish"), 0.0)
    rows = dict.fromkeys(TABLE_NAMES, 0)

    migrate(database_url)
    timings["migrate"] = time.perf_counter() - started
    with psycopg.connect(psycopg_conninfo(database_url), autocommit=True) as connection:
        occupied = _sandbox_tables_with_rows(connection)
        bucket_used = (
            s3_client is not None
            and _bucket_exists(s3_client, content_bucket)
            and s3_assets.has_objects(s3_client, content_bucket)
        )
        if (occupied or bucket_used) and not reset:
            where = f"tables {', '.join(occupied)}" if occupied else f"bucket {content_bucket} under accounts/"
            raise SandboxNotEmptyError(
                f"the sandbox is not empty ({where}): seed an empty database, or pass reset=True to replace it"
            )
        if occupied or bucket_used:
            _reset(connection, s3_client, stripe_client, content_bucket)
        if s3_client is not None:
            s3_assets.ensure_versioned_bucket(s3_client, content_bucket)

        bar = tqdm(total=accounts, unit="account", desc="seeding CellCMS", file=sys.stderr, disable=not progress)
        with bar, ThreadPoolExecutor(max_workers=upload_workers, thread_name_prefix="s3-upload") as pool:
            producer = _Producer(
                generator=SyntheticCellCMS(
                    seed=seed, now=now or _start_of_today(), s3_accounts=s3_cap, stripe_accounts=stripe_cap
                ),
                accounts=accounts,
                external_until=max(s3_cap, stripe_cap),
                s3_client=s3_client,
                bucket=content_bucket,
                stripe=StripeSeeder(stripe_client) if stripe_client is not None else None,
                pool=pool,
                timings=timings,
            )
            chunks = _Prefetch(producer.chunks(), depth=_PREFETCH_DEPTH)
            try:
                with connection.transaction():
                    with _constraints_deferred(connection), connection.cursor() as cursor:
                        for size, chunk in chunks:
                            mark = time.perf_counter()
                            _copy_chunk(cursor, chunk)
                            timings["copy"] += time.perf_counter() - mark
                            for table, table_rows in chunk.rows.items():
                                rows[table] += len(table_rows)
                            bar.set_postfix(
                                rows=sum(rows.values()),
                                s3=producer.s3_versions,
                                stripe=len(producer.created_customers),
                                refresh=False,
                            )
                            bar.update(size)
                        finish_started = time.perf_counter()  # recreating indexes and keys follows
                    _set_sequences(connection)
            except BaseException:
                chunks.close()
                _cleanup_after_failure(producer, s3_client, stripe_client, content_bucket)
                raise
            chunks.close()
        connection.execute("ANALYZE " + ", ".join(TABLE_NAMES))  # fresh statistics for the flows' queries
        timings["finish"] = time.perf_counter() - finish_started

    return SeedReport(
        accounts=accounts,
        seed=seed,
        rows=rows,
        s3_accounts=s3_cap,
        s3_object_versions=producer.s3_versions,
        stripe_accounts=stripe_cap,
        stripe_customers=len(producer.created_customers),
        stripe_invoices_linked=producer.stripe_invoices,
        seconds=time.perf_counter() - started,
        timings=timings,
    )


def _start_of_today() -> datetime:
    return datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)

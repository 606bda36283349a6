"""Benchmark: nightly retention of deleted accounts, the project's engine against hand-written set-based SQL.

    python bench/retention.py --accounts 100000

1. Starts the local stack's PostgreSQL and S3 (privacy_ops.stack; S3 only because the retention checks publish
   their Data Docs to the export bucket) in its own state dir (PRIVACY_OPS_HOME, default .privacy-ops-bench/),
   stopped again at the end, seeds N synthetic accounts (cellcms_sandbox, PostgreSQL only: no S3 objects, no Stripe
   customers) into database `bench_seed_<N>`, marks exactly 20% of the accounts (id % 5 = 0) deleted 41 days before
   the run's as_of date (every other account not deleted), creates the privacy_ops schema, then copies the
   database twice (CREATE DATABASE ... TEMPLATE bench_seed_<N>): `bench_project` and `bench_sql`. One seed per N
   is kept, so --reuse-seed serves runs at 10,000 and 100,000 accounts in turn.
2. Project, on bench_project, in a fresh child process: what flows/nightly_retention.py does per rule for the
   rules this scenario triggers (`deleted_account_content`, `deleted_accounts`): measure the share
   (measure_rule), act in audited batches (privacy_ops.retention.apply_rule, given that measurement and approved
   as an operator would), then the Great Expectations retention suite (tasks.retention.check_retention, audit
   entry included). Timed end to end, checks and Data Docs included; Prefect itself is not started (a task per
   rule costs milliseconds).
   The rules' own S3 and Stripe work is left out (the map's s3 and stripe sections removed for the run): the
   seed has no objects or customers, and the hand-written SQL cannot do it either.
3. Hand-written SQL, on bench_sql, in a fresh child process: the same changes (the data map's erasure actions
   for those accounts) as a dozen set-based statements in ONE transaction.
4. Both copies are compared table by table (row count and a checksum of every row's primary key) and on the
   columns anonymisation writes (invoices, documents, privacy_ops.retained_records). A difference is printed
   loudly and the exit status is 1.

Throughput of both sides is the same number of rows changed (deleted + anonymised + retained_records written,
from count queries on the end state, which is identical for both) divided by each side's wall time, so the ratio
is the SQL's time over the project's. The engine's own report is printed next to it and cross-checked.
Peak RSS is each child process's VmHWM (the kernel's high-water mark), with a 20 ms psutil sample for the
baseline after imports. The last line is `ratio_vs_sql=<R> peak_rss_mb=<M>`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from datetime import time as dtime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/retention.py` puts bench/ first on the path, not the project
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("PRIVACY_OPS_HOME", str(ROOT / ".privacy-ops-bench"))
os.environ.setdefault("PREFECT_HOME", str(Path(os.environ["PRIVACY_OPS_HOME"]) / "prefect-client"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import psutil  # noqa: E402
import psycopg  # noqa: E402

RULES = ("deleted_account_content", "deleted_accounts")
RUN_ID = "bench"
PROJECT_DB, SQL_DB = "bench_project", "bench_sql"
DELETED_SHARE_MODULO = 5  # id % 5 = 0: 20% of the accounts
DELETED_DAYS_AGO = 41
RESULT_PREFIX = "BENCH-RESULT "
SECRET_VARIABLE = "PRIVACY_OPS_SECRET_KEY"

# Mapped tables and their primary keys (checked against the data map at start), plus our own retained_records.
ANONYMISED_COLUMNS: dict[str, tuple[str, list[str]]] = {
    "invoices": ("id", ["account_id", "billing_name", "billing_email", "billing_address"]),
    "documents": ("id", ["author_account_id", "title", "body"]),
    "privacy_ops.retained_records": (
        "table_name, row_key",
        ["request_id", "pseudonym", "table_name", "row_key", "legal_basis", "purge_after"],
    ),
}


def seed_database(accounts: int) -> str:
    return f"bench_seed_{accounts}"


def log(line: str) -> None:
    print(f"[bench {datetime.now():%H:%M:%S}] {line}", file=sys.stderr, flush=True)


def database_url(url: str, name: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).set(database=name).render_as_string(hide_password=False)


def conninfo(url: str) -> str:
    from cellcms_sandbox.database import psycopg_conninfo

    return psycopg_conninfo(url)


# ------------------------------------------------------------------------------------------------ memory
class PeakRss:
    """Samples this process's RSS every 20 ms; `baseline` is set by `mark()` (after imports)."""

    def __init__(self) -> None:
        self._process = psutil.Process()
        self.peak = self._process.memory_info().rss
        self.baseline = self.peak
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def mark(self) -> None:
        self.baseline = self._process.memory_info().rss

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        # VmHWM: this process image's own high-water mark. (getrusage's ru_maxrss would also include the
        # parent's RSS at fork, which Linux carries across exec.)
        status = Path("/proc/self/status").read_text()
        hwm_kb = int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE).group(1))  # type: ignore[union-attr]
        return {
            "baseline_mb": self.baseline / 2**20,
            "sampled_peak_mb": self.peak / 2**20,
            "peak_rss_mb": hwm_kb / 1024,
        }


# ------------------------------------------------------------------------------------------------ project side
class StatementProfile:
    """Seconds and calls per statement shape (bind lists collapsed) on an engine's connections."""

    def __init__(self, engine: Any) -> None:
        from sqlalchemy import event

        self.seconds: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        event.listen(engine, "before_cursor_execute", self._before)
        event.listen(engine, "after_cursor_execute", self._after)

    @staticmethod
    def _before(conn: Any, _cursor: Any, _statement: str, _params: Any, _context: Any, _many: bool) -> None:
        conn.info.setdefault("bench_started", []).append(time.perf_counter())

    def _after(self, conn: Any, _cursor: Any, statement: str, _params: Any, _context: Any, _many: bool) -> None:
        began = conn.info["bench_started"].pop()
        shape = re.sub(r"%\(\w+\)s(, %\(\w+\)s)*", "?", " ".join(statement.split()))
        self.seconds[shape] += time.perf_counter() - began
        self.calls[shape] += 1

    def top(self, count: int = 12) -> list[dict[str, Any]]:
        return [
            {"statement": shape[:160], "calls": self.calls[shape], "seconds": round(spent, 3)}
            for shape, spent in self.seconds.most_common(count)
        ]


def project_phase(url: str, as_of: date, profile: bool, batch_size: int | None) -> dict[str, Any]:
    memory = PeakRss()
    began_imports = time.perf_counter()
    import great_expectations  # noqa: F401  (a nightly run's process imports it once; not part of the timing)
    from pydantic import SecretStr
    from sqlalchemy import create_engine

    from privacy_ops import retention
    from privacy_ops.datamap import load_datamap
    from privacy_ops.services import Services
    from privacy_ops.settings import Settings, read_stack_values
    from privacy_ops.stores import s3 as s3_store
    from tasks.retention import check_retention

    imports = time.perf_counter() - began_imports
    stack = read_stack_values()  # the bench stack's S3 (moto) and secret key
    settings = Settings(
        database_url=SecretStr(url),
        s3_endpoint_url=stack["s3_endpoint_url"],
        s3_access_key_id=stack["s3_access_key_id"],
        s3_secret_access_key=SecretStr(stack["s3_secret_access_key"]),
        stripe_api_key=SecretStr("sk_unused_by_this_benchmark"),
        smtp_host="127.0.0.1",
        smtp_port=25,
        secret_key=SecretStr(os.environ[SECRET_VARIABLE]),
    )
    s3 = s3_store.client(settings)  # only the checks use it: Data Docs are published to the export bucket
    # The retention rules' S3 and Stripe work is skipped: the map without its s3 and stripe sections.
    datamap = load_datamap(settings.datamap_path).model_copy(update={"s3": {}, "stripe": None})
    if batch_size is not None and datamap.retention is not None:  # --batch-size: the map's retention.batch_size
        retention_map = datamap.retention.model_copy(update={"batch_size": batch_size})
        datamap = datamap.model_copy(update={"retention": retention_map})
    engine = create_engine(url)
    statements = StatementProfile(engine) if profile else None
    services = Services(settings=settings, engine=engine, s3=s3, stripe=None, datamap=datamap)
    ctx = retention.Context(
        datamap=datamap,
        as_of=as_of,
        engine=engine,
        s3=s3,
        stripe=None,
        settings=settings,
        secret_key=services.secret_key,
        run_id=RUN_ID,
    )
    with engine.connect():
        pass  # the pool's first connection, outside the timing like the SQL side's connect
    memory.mark()

    started = time.perf_counter()
    rules: list[dict[str, Any]] = []
    try:
        for name in RULES:
            mark = time.perf_counter()
            share = retention.measure_share(ctx, name)  # the flow's measure_rule task
            report = retention.apply_rule(  # the flow's apply_rule step, approved as an operator would
                ctx, name, max_share=retention.DEFAULT_MAX_SHARE, approved=True, share=share
            )
            rules.append({**report.summary(), "measured_share": round(share.share, 4), "seconds": 0.0})
            rules[-1]["seconds"] = time.perf_counter() - mark
        acted = time.perf_counter()
        verdict = check_retention.fn(services, RUN_ID, as_of, list(RULES))
        finished = time.perf_counter()
    except Exception as error:  # reported, not raised: the benchmark still prints its figures
        # Only the driver's own message: SQLAlchemy's text would carry the bound parameters (identifiers).
        cause = getattr(error, "orig", None) or error
        failed = {
            "error": f"{type(cause).__name__}: {str(cause).splitlines()[0][:300]}",
            "failed_rule": RULES[len(rules)] if len(rules) < len(RULES) else "checks",
            "seconds": time.perf_counter() - started,
            "import_seconds": imports,
            "rules": rules,
            **memory.stop(),
        }
        if statements is not None:
            failed["profile"] = statements.top()
        return failed
    finally:
        engine.dispose()

    result: dict[str, Any] = {
        "seconds": finished - started,
        "act_seconds": acted - started,
        "check_seconds": finished - acted,
        "import_seconds": imports,
        "rules": rules,
        "reported_rows": sum(int(r["stores"]["postgres"]) for r in rules),
        "checks": {"success": verdict["success"], "expectations": verdict.get("expectations")},
        "check_failures": verdict.get("failures", []),
        **memory.stop(),
    }
    if statements is not None:
        result["profile"] = statements.top()
    return result


# ------------------------------------------------------------------------------------------------ SQL side
# The deleted-account rules written by hand from datamap/cellcms.yaml's erasure actions, as one transaction.
# Parameters: cutoff (as_of midnight - 30 days), hash_key, request_id, legal_basis, purge_days, and regex pieces
# passed as values so that no backslash or percent sign needs escaping in the statements.
HAND_WRITTEN_SQL: list[tuple[str, str]] = [
    (
        "accounts past their period, not held",
        """CREATE TEMP TABLE gone ON COMMIT DROP AS
           SELECT a.id FROM accounts a
           WHERE a.deleted_at < %(cutoff)s
             AND NOT EXISTS (SELECT 1 FROM privacy_ops.legal_holds h
                             WHERE h.lifted_at IS NULL AND h.account_id = a.id)""",
    ),
    ("  its key", "ALTER TABLE gone ADD PRIMARY KEY (id)"),
    ("  its statistics", "ANALYZE gone"),
    (
        "documents they wrote in projects that stay: author removed, their identifiers redacted",
        # The author's identifiers of the kinds free-text redaction looks for (email, name, phone, ip,
        # external id; privacy_ops.checks.text_pattern): each value, emails also percent-encoded, phones also
        # as bare digits; punctuation escaped, whole words where a value starts/ends with a letter or digit.
        """WITH authors AS (
             SELECT DISTINCT d.author_account_id AS id
             FROM documents d JOIN gone g ON g.id = d.author_account_id
             JOIN projects p ON p.id = d.project_id
             WHERE NOT EXISTS (SELECT 1 FROM gone o WHERE o.id = p.owner_account_id)
           ), raw(account_id, kind, v) AS (
             SELECT a.id, 'email', a.email FROM accounts a JOIN authors USING (id)
             UNION ALL SELECT a.id, 'name', a.full_name FROM accounts a JOIN authors USING (id)
             UNION ALL SELECT a.id, 'phone', a.phone FROM accounts a JOIN authors USING (id)
             UNION ALL SELECT c.account_id, 'ip', host(c.ip_address)
               FROM cookie_consents c JOIN authors u ON u.id = c.account_id
             UNION ALL SELECT b.account_id, 'external_id', b.stripe_customer_id
               FROM billing_profiles b JOIN authors u ON u.id = b.account_id
             UNION ALL SELECT b.account_id, 'name', b.billing_name
               FROM billing_profiles b JOIN authors u ON u.id = b.account_id
             UNION ALL SELECT b.account_id, 'email', b.billing_email
               FROM billing_profiles b JOIN authors u ON u.id = b.account_id
             UNION ALL SELECT b.account_id, 'external_id', b.vat_number
               FROM billing_profiles b JOIN authors u ON u.id = b.account_id
             UNION ALL SELECT p.owner_account_id, 'ip', host(v.uploader_ip)
               FROM asset_versions v JOIN assets s ON s.id = v.asset_id JOIN projects p ON p.id = s.project_id
               JOIN authors u ON u.id = p.owner_account_id
             UNION ALL SELECT l.account_id, 'ip', host(l.ip_address)
               FROM access_logs l JOIN authors u ON u.id = l.account_id
             UNION ALL SELECT e.account_id, 'ip', host(e.ip_address)
               FROM error_logs e JOIN authors u ON u.id = e.account_id
           ), clean AS (
             SELECT DISTINCT account_id, kind, btrim(v, %(space)s) AS v FROM raw
             WHERE v IS NOT NULL AND btrim(v, %(space)s) <> ''
           ), tokens AS (
             SELECT account_id, v AS t FROM clean
             UNION SELECT account_id, (
                 SELECT string_agg(CASE WHEN ch ~ '^[A-Za-z0-9_.~-]$' THEN ch
                        ELSE upper(regexp_replace(encode(convert_to(ch, 'UTF8'), 'hex'), '(..)', %(pct)s, 'g'))
                        END, '' ORDER BY n)
                 FROM regexp_split_to_table(v, '') WITH ORDINALITY AS s(ch, n))
               FROM clean WHERE kind = 'email'
             UNION SELECT account_id, regexp_replace(v, '[^0-9]', '', 'g') FROM clean
               WHERE kind = 'phone' AND length(regexp_replace(v, '[^0-9]', '', 'g')) >= 7
           ), literals AS (
             SELECT account_id,
                    CASE WHEN t ~ '^[[:alnum:]]' THEN %(before)s ELSE '' END
                    || regexp_replace(t, %(punct)s, %(escaped)s, 'g')
                    || CASE WHEN t ~ '[[:alnum:]]$' THEN %(after)s ELSE '' END AS l
             FROM tokens
           ), patterns AS (
             SELECT account_id, '(?i)(?:' || string_agg(l, '|' ORDER BY l COLLATE "C") || ')' AS pattern
             FROM literals GROUP BY account_id
           )
           UPDATE documents d
           SET author_account_id = NULL,
               title = regexp_replace(d.title, coalesce(pt.pattern, '(?!)'), '[redacted]', 'gi'),
               body = regexp_replace(d.body, coalesce(pt.pattern, '(?!)'), '[redacted]', 'gi')
           FROM projects p, gone g LEFT JOIN patterns pt ON pt.account_id = g.id
           WHERE d.author_account_id = g.id AND p.id = d.project_id
             AND NOT EXISTS (SELECT 1 FROM gone o WHERE o.id = p.owner_account_id)""",
    ),
    (
        "asset_versions of their projects",
        """DELETE FROM asset_versions v USING assets s, projects p, gone g
           WHERE v.asset_id = s.id AND s.project_id = p.id AND p.owner_account_id = g.id""",
    ),
    (
        "assets of their projects",
        "DELETE FROM assets s USING projects p, gone g WHERE s.project_id = p.id AND p.owner_account_id = g.id",
    ),
    (
        "content_schemas of their projects",
        """DELETE FROM content_schemas c USING projects p, gone g
           WHERE c.project_id = p.id AND p.owner_account_id = g.id""",
    ),
    (
        "documents of their projects",
        "DELETE FROM documents d USING projects p, gone g WHERE d.project_id = p.id AND p.owner_account_id = g.id",
    ),
    (
        "project_members: theirs, and of their projects",
        """DELETE FROM project_members m
           WHERE m.account_id IN (SELECT id FROM gone)
              OR m.project_id IN (SELECT p.id FROM projects p JOIN gone g ON g.id = p.owner_account_id)""",
    ),
    ("projects", "DELETE FROM projects p USING gone g WHERE p.owner_account_id = g.id"),
    (
        "support_messages of their tickets",
        """DELETE FROM support_messages m USING support_tickets t, gone g
           WHERE m.ticket_id = t.id AND t.account_id = g.id""",
    ),
    *[
        (table, f"DELETE FROM {table} x USING gone g WHERE x.account_id = g.id")
        for table in (
            "support_tickets",
            "survey_responses",
            "page_views",
            "feature_usage",
            "api_call_counts",
            "devices",
            "access_logs",
            "error_logs",
            "cookie_consents",
            "preferences",
            "processing_objections",
            "analytics_profiles",
            "marketing_audience_members",
            "billing_profiles",
        )
    ],
    (
        "invoices kept for tax law: listed with pseudonym and purge date",
        """INSERT INTO privacy_ops.retained_records
             (request_id, pseudonym, table_name, row_key, legal_basis, purge_after)
           SELECT %(request_id)s,
                  'psn_' || left(encode(sha256(convert_to(
                      concat_ws('|', %(hash_key)s::text, 'subject', i.account_id::text), 'UTF8')), 'hex'), 24),
                  'invoices', i.id::text, %(legal_basis)s,
                  (i.issued_at + make_interval(days => %(purge_days)s))::date
           FROM invoices i JOIN gone g ON g.id = i.account_id
           ON CONFLICT DO NOTHING""",
    ),
    (
        "invoices kept for tax law: anonymised",
        """UPDATE invoices i
           SET account_id = NULL, billing_name = NULL, billing_address = NULL,
               billing_email = 'psn_' || left(encode(sha256(convert_to(
                   concat_ws('|', %(hash_key)s::text, 'subject', i.account_id::text), 'UTF8')), 'hex'), 24)
           FROM gone g WHERE i.account_id = g.id""",
    ),
    ("accounts", "DELETE FROM accounts a USING gone g WHERE a.id = g.id"),
]


def sql_parameters(as_of: date, secret_key: str) -> dict[str, Any]:
    moment = datetime.combine(as_of, dtime(0), UTC)
    return {
        "cutoff": moment - timedelta(days=30),
        "hash_key": secret_key,
        "request_id": f"retention-{RUN_ID}",
        "legal_basis": "tax law: billing records are kept for up to 7 years (privacy policy section 6)",
        "purge_days": 2557,
        "space": " \t\n\r\x0b\x0c",
        "pct": r"%\1",
        "before": "(?<![[:alnum:]])",
        "after": "(?![[:alnum:]])",
        "punct": "([!-/:-@[-`{-~])",
        "escaped": r"\\\1",
    }


def sql_phase(url: str, as_of: date) -> dict[str, Any]:
    memory = PeakRss()
    params = sql_parameters(as_of, os.environ[SECRET_VARIABLE])
    statements: list[dict[str, Any]] = []
    with psycopg.connect(conninfo(url)) as connection:
        memory.mark()
        started = time.perf_counter()
        with connection.transaction(), connection.cursor() as cursor:
            for label, statement in HAND_WRITTEN_SQL:
                mark = time.perf_counter()
                cursor.execute(statement, params)
                rows = max(cursor.rowcount, 0) if statement.lstrip().split()[0] != "CREATE" else 0
                statements.append({"statement": label, "rows": rows, "seconds": time.perf_counter() - mark})
        finished = time.perf_counter()
    return {
        "seconds": finished - started,
        "statements": statements,
        "reported_rows": sum(s["rows"] for s in statements),
        **memory.stop(),
    }


# ------------------------------------------------------------------------------------------------ state
@dataclass(frozen=True)
class TableState:
    rows: int
    keys: int  # order-independent checksum of the primary keys
    anonymised: int | None  # the same over the columns anonymisation writes (three tables only)


def table_state(url: str, tables: dict[str, list[str]]) -> dict[str, TableState]:
    state = {}
    with psycopg.connect(conninfo(url)) as connection:
        for table, key in tables.items():
            key_text = "concat_ws(',', " + ", ".join(f"{k}::text" for k in key) + ")"
            columns = ANONYMISED_COLUMNS.get(table)
            anonymised = "NULL::numeric"
            if columns is not None:
                values = ", ".join(f"coalesce({c}::text, '<null>')" for c in columns[1])
                anonymised = f"sum(hashtext(concat_ws('|', {key_text}, {values}))::numeric)"
            row = connection.execute(
                f"SELECT count(*), coalesce(sum(hashtext({key_text})::numeric), 0), {anonymised} FROM {table}"
            ).fetchone()
            assert row is not None
            state[table] = TableState(int(row[0]), int(row[1]), None if row[2] is None else int(row[2]))
    return state


def expected_anonymised(url: str, cutoff: datetime) -> dict[str, int]:
    """Rows the scenario anonymises (counted on the seeded copy, before either run)."""
    with psycopg.connect(conninfo(url)) as connection:
        documents = connection.execute(
            """SELECT count(*) FROM documents d JOIN accounts a ON a.id = d.author_account_id
               JOIN projects p ON p.id = d.project_id JOIN accounts o ON o.id = p.owner_account_id
               WHERE a.deleted_at < %(c)s AND NOT coalesce(o.deleted_at < %(c)s, false)""",
            {"c": cutoff},
        ).fetchone()
        invoices = connection.execute(
            "SELECT count(*) FROM invoices i JOIN accounts a ON a.id = i.account_id WHERE a.deleted_at < %(c)s",
            {"c": cutoff},
        ).fetchone()
    assert documents is not None and invoices is not None
    return {"documents": int(documents[0]), "invoices": int(invoices[0])}


# ------------------------------------------------------------------------------------------------ setup
def prepare(url: str, accounts: int, as_of: date, reuse: bool) -> None:
    """bench_seed_<N> (seeded, 20% deleted 41 days ago, privacy_ops schema) and its two copies."""
    seed_db = seed_database(accounts)
    from sqlalchemy import create_engine

    from cellcms_sandbox.generator import seed_sandbox
    from privacy_ops.lifecycle.schema import ensure_schema

    marker = f"privacy-ops bench: accounts={accounts} as_of={as_of.isoformat()} v1"
    admin = conninfo(database_url(url, "postgres"))
    with psycopg.connect(admin, autocommit=True) as connection:
        for name in (PROJECT_DB, SQL_DB):
            connection.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        found = connection.execute(
            "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s", (seed_db,)
        ).fetchone()
        if reuse and found is not None and found[0] == marker:
            log(f"reusing {seed_db} ({marker})")
        else:
            connection.execute(f"DROP DATABASE IF EXISTS {seed_db} WITH (FORCE)")
            connection.execute(f"CREATE DATABASE {seed_db}")
            seed_url = database_url(url, seed_db)
            log(f"seeding {accounts:,} accounts (PostgreSQL only) ...")
            report = seed_sandbox(seed_url, None, None, "cellcms-content", accounts, progress=False)
            log(report.summary())
            moment = datetime.combine(as_of, dtime(0), UTC)
            engine = create_engine(seed_url)
            with engine.begin() as db:
                ensure_schema(db)
            engine.dispose()
            with psycopg.connect(conninfo(seed_url), autocommit=True) as seed:
                seed.execute(
                    "UPDATE accounts SET deleted_at = CASE WHEN id %% %(every)s = 0 THEN %(at)s END",
                    {"every": DELETED_SHARE_MODULO, "at": moment - timedelta(days=DELETED_DAYS_AGO)},
                )
                seed.execute("VACUUM ANALYZE")
            connection.execute(f"COMMENT ON DATABASE {seed_db} IS '{marker}'")
        for name in (PROJECT_DB, SQL_DB):
            connection.execute(f"CREATE DATABASE {name} TEMPLATE {seed_db}")
        log(f"copies {PROJECT_DB} and {SQL_DB} made from {seed_db}")


def run_child(phase: str, url: str, as_of: date, secret_key: str, options: list[str]) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--phase", phase, "--as-of", as_of.isoformat()]
    command += options
    env = {**os.environ, SECRET_VARIABLE: secret_key, "BENCH_DATABASE_URL": url}
    log(f"{phase}: running ...")
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{phase} phase failed (exit {done.returncode}):\n{done.stdout}")
    result: dict[str, Any] = json.loads(lines[-1][len(RESULT_PREFIX) :])
    return result


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--accounts", type=int, default=100_000, help="accounts to seed (default 100000)")
    parser.add_argument("--as-of", type=date.fromisoformat, default=datetime.now(UTC).date())
    parser.add_argument(
        "--reuse-seed", action="store_true", help="reuse bench_seed_<N> if seeded for the same --as-of"
    )
    parser.add_argument("--profile", action="store_true", help="time the project's statements by shape")
    parser.add_argument(
        "--batch-size", type=int, help="override the data map's retention.batch_size for the project run"
    )
    parser.add_argument("--keep-stack", action="store_true", help="leave PostgreSQL running at the end")
    parser.add_argument("--phase", choices=("project", "sql"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.phase is not None:  # a child process: one side of the comparison
        url = os.environ["BENCH_DATABASE_URL"]
        if args.phase == "project":
            result = project_phase(url, args.as_of, args.profile, args.batch_size)
        else:
            result = sql_phase(url, args.as_of)
        print(RESULT_PREFIX + json.dumps(result, default=str), flush=True)
        return 0

    if args.accounts < DELETED_SHARE_MODULO:
        parser.error(f"--accounts must be at least {DELETED_SHARE_MODULO}")
    for variable in ("CELLCMS_DATABASE_URL",):  # our own PostgreSQL, never an external one
        os.environ.pop(variable, None)
    from privacy_ops.datamap import load_datamap
    from privacy_ops.settings import PROJECT_ROOT
    from privacy_ops.stack import start_stack, stop_stack

    load = os.getloadavg()
    datamap = load_datamap(PROJECT_ROOT / "datamap" / "cellcms.yaml")
    tables = {name: list(spec.primary_key) for name, spec in datamap.postgres.tables.items()}
    tables["privacy_ops.retained_records"] = ["table_name", "row_key"]
    info = start_stack(["postgres", "s3"], progress=log)
    try:
        base_url = str(info.settings["database_url"])
        secret_key = str(info.settings["secret_key"])
        prepare(base_url, args.accounts, args.as_of, args.reuse_seed)
        seed_url = database_url(base_url, seed_database(args.accounts))
        cutoff = datetime.combine(args.as_of, dtime(0), UTC) - timedelta(days=30)
        before = table_state(seed_url, tables)
        anonymised = expected_anonymised(seed_url, cutoff)
        project_url, sql_url = database_url(base_url, PROJECT_DB), database_url(base_url, SQL_DB)
        load_before = os.getloadavg()
        options = ["--profile"] if args.profile else []
        if args.batch_size is not None:
            options += ["--batch-size", str(args.batch_size)]
        project = run_child("project", project_url, args.as_of, secret_key, options)
        sql = run_child("sql", sql_url, args.as_of, secret_key, [])
        load_after = os.getloadavg()
        after_project, after_sql = table_state(project_url, tables), table_state(sql_url, tables)
        with psycopg.connect(conninfo(base_url), autocommit=True) as connection:
            for name in (PROJECT_DB, SQL_DB):
                connection.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        if not args.keep_stack:
            stop_stack(progress=log)

    # The end state both sides must reach is the hand-written SQL's (checked equal to the project's below).
    deleted = sum(before[t].rows - after_sql[t].rows for t in tables if t in datamap.postgres.tables)
    retained = after_sql["privacy_ops.retained_records"].rows - before["privacy_ops.retained_records"].rows
    changed = deleted + anonymised["documents"] + anonymised["invoices"] + retained
    differences = [
        f"{t}: project {after_project[t]} != sql {after_sql[t]}"
        for t in tables
        if after_project[t] != after_sql[t]
    ]
    failed = "error" in project
    report(args, load, (load_before[0], load_after[0]), before, after_sql, changed, anonymised, project, sql)
    if differences:
        print("!" * 100)
        print("!!! THE TWO COPIES DIFFER: the comparison is NOT of the same changes")
        for line in differences:
            print(f"!!! {line}")
        print("!" * 100)
    else:
        print(f"end states identical: {len(tables)} tables (row counts, key checksums, anonymised columns)")
    sql_rate = changed / sql["seconds"]
    project_rate = 0.0 if failed else changed / project["seconds"]
    for name, side, rate in (("project", project, project_rate), ("sql", sql, sql_rate)):
        print(
            f"{name:8} {side['seconds']:8.2f} s  {rate:12,.0f} rows/s  peak RSS {side['peak_rss_mb']:7.1f} MB "
            f"(after imports {side['baseline_mb']:.1f} MB, sampled peak {side['sampled_peak_mb']:.1f} MB)"
            + ("  FAILED: 0 rows/s" if name == "project" and failed else "")
        )
    print(f"ratio_vs_sql={project_rate / sql_rate:.2f} peak_rss_mb={project['peak_rss_mb']:.0f}")
    return 1 if differences or failed or not project["checks"]["success"] else 0


def report(
    args: argparse.Namespace,
    load: tuple[float, float, float],
    load_runs: tuple[float, float],
    before: dict[str, TableState],
    after: dict[str, TableState],
    changed: int,
    anonymised: dict[str, int],
    project: dict[str, Any],
    sql: dict[str, Any],
) -> None:
    deleted_accounts = before["accounts"].rows - after["accounts"].rows
    batch = f", project batch size {args.batch_size} (--batch-size)" if args.batch_size else ""
    print(
        f"accounts: {args.accounts:,} seeded, {deleted_accounts:,} deleted {DELETED_DAYS_AGO} days before as_of "
        f"{args.as_of.isoformat()}; rules: {', '.join(RULES)}{batch}; S3 and Stripe skipped (not seeded, not in "
        "the map)"
    )
    print(
        f"load average (1 min): {load[0]:.2f} at start, {load_runs[0]:.2f} before the runs, {load_runs[1]:.2f} "
        "after (2 cores, shared with other engineers)"
    )
    retained = after["privacy_ops.retained_records"].rows - before["privacy_ops.retained_records"].rows
    print(
        f"rows changed (end state, count queries): {changed:,} = "
        f"{changed - anonymised['documents'] - anonymised['invoices'] - retained:,} deleted + "
        f"{anonymised['documents']:,} documents and {anonymised['invoices']:,} invoices anonymised + "
        f"{retained:,} retained_records written"
    )
    print("per table (rows before -> after):")
    for t in before:
        if before[t].rows != after[t].rows:
            print(f"  {t:32} {before[t].rows:>10,} -> {after[t].rows:>10,}")
    if "error" in project:
        print("!" * 100)
        print(
            f"!!! PROJECT RUN FAILED in {project['failed_rule']} after {project['seconds']:.1f} s: "
            f"{project['error']}"
        )
        print("!" * 100)
    else:
        expected = changed - retained  # the engine counts retained invoices once, not their retained_records row
        print(
            f"project: engine report {project['reported_rows']:,} postgres rows; count queries {expected:,} "
            "(+ retained_records, which the report does not count); a document anonymised in one batch and "
            "deleted with its project's owner in a later one counts twice in the report"
        )
    for rule in project["rules"]:
        print(
            f"  rule {rule['rule']:24} {rule['seconds']:7.2f} s  selected {rule['selected']:>7,}  "
            f"rows {rule['stores']['postgres']:>9,}  batches {rule['batches']}  share {rule['measured_share']}"
        )
    if "checks" in project:
        print(
            f"  checks (Great Expectations) {project['check_seconds']:7.2f} s  "
            f"success={project['checks']['success']} expectations={project['checks']['expectations']}"
        )
        for failure in project["check_failures"]:
            print(f"  CHECK FAILURE: {failure}")
    print(f"  imports, outside the timing: {project['import_seconds']:.1f} s")
    for item in project.get("profile", []):
        print(f"  profile {item['seconds']:8.2f} s {item['calls']:>6} x  {item['statement']}")
    print(f"sql: {sql['reported_rows']:,} rows by rowcount, one transaction")
    for item in sql["statements"]:
        print(f"  {item['seconds']:7.2f} s {item['rows']:>9,}  {item['statement']}")


if __name__ == "__main__":
    sys.exit(main())

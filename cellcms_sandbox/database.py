"""Connecting to the sandbox CellCMS database and bringing its schema to the current Alembic revision.

One database URL serves two drivers: SQLAlchemy (Alembic, queries) wants `postgresql+psycopg://`, while the bulk
loader talks to psycopg 3 directly (COPY), which wants a libpq conninfo. Both are derived here from whatever
PostgreSQL URL the settings hold, including the embedded server's Unix-socket form (`...?host=/path`).
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from psycopg.conninfo import make_conninfo
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Connection, make_url

from cellcms_sandbox.schema import metadata

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

# Dependency order (parents first): the order to load in; reversed, the order to empty in.
TABLE_NAMES: tuple[str, ...] = tuple(table.name for table in metadata.sorted_tables)

# Any constant will do: it only has to be the same for every process that migrates this database.
_MIGRATION_LOCK_KEY = 0x63656C6C636D73  # "cellcms"


def sqlalchemy_url(database_url: str) -> str:
    """The URL with the psycopg 3 driver named, so SQLAlchemy does not fall back to psycopg2."""
    url = make_url(database_url)
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    return url.render_as_string(hide_password=False)


def psycopg_conninfo(database_url: str) -> str:
    """A libpq conninfo string for `psycopg.connect`, from a SQLAlchemy-style URL (any driver suffix)."""
    url = make_url(database_url)
    params: dict[str, str | int] = {}
    if url.host:
        params["host"] = url.host
    if url.port:
        params["port"] = url.port
    if url.username:
        params["user"] = url.username
    if url.password:
        params["password"] = str(url.password)
    if url.database:
        params["dbname"] = url.database
    for key, value in url.query.items():
        # Multi-valued query parameters (rare: several hosts) keep their last value.
        params[key] = value if isinstance(value, str) else value[-1]
    return make_conninfo("", **params)


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic configuration pointing at the packaged migrations; needs no alembic.ini on disk."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def migrate(database_url: str) -> None:
    """Run `alembic upgrade head` on the CellCMS database: creates the sandbox tables, a no-op when current.

    Safe to call from several processes at once: a transaction-scoped advisory lock serialises them.
    """
    engine = create_engine(sqlalchemy_url(database_url))
    try:
        with engine.begin() as connection:
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
            command.upgrade(alembic_config(connection), "head")
    finally:
        engine.dispose()


def current_revision(database_url: str) -> str | None:
    """The Alembic revision the database is at, or None before the first migration."""
    from alembic.runtime.migration import MigrationContext

    engine = create_engine(sqlalchemy_url(database_url))
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()

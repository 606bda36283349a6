"""Alembic environment of the sandbox CellCMS schema (`cellcms_sandbox.schema`).

`cellcms_sandbox.database.migrate()` hands over an open connection in `config.attributes["connection"]` (it holds
an advisory lock on it, so concurrent migrations wait instead of racing). Run by hand (`alembic -c
cellcms_sandbox/alembic.ini upgrade head`), the URL comes from CELLCMS_DATABASE_URL instead.
"""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import create_engine
from sqlalchemy.engine import Connection

from cellcms_sandbox.database import sqlalchemy_url
from cellcms_sandbox.schema import metadata

config = context.config
URL_VARIABLE = "CELLCMS_DATABASE_URL"


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url") or os.environ.get(URL_VARIABLE)
    if not url:
        raise RuntimeError(f"{URL_VARIABLE} is not set: alembic needs the CellCMS database URL")
    return sqlalchemy_url(url)


def _configure_and_run(connection: Connection) -> None:
    # Only the default (public) schema is compared: privacy_ops keeps its own tables in schema `privacy_ops`.
    context.configure(connection=connection, target_metadata=metadata, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


def run_offline() -> None:
    context.configure(url=_url(), target_metadata=metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure_and_run(connection)
        return
    engine = create_engine(_url())
    try:
        with engine.begin() as own_connection:
            _configure_and_run(own_connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()

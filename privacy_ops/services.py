"""Ready clients for one process: settings resolved once, then the database engine, S3, Stripe and the data map.

Flows call `services()` once and hand the result to their tasks, which never build clients themselves.
Settings come from Prefect blocks when PRIVACY_OPS_BLOCKS names them (deployed workers), else from the environment
and the local stack (`privacy_ops.settings.load_settings`).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, create_engine

from privacy_ops.datamap import load_datamap
from privacy_ops.datamap.model import DataMap
from privacy_ops.lifecycle.schema import ensure_schema
from privacy_ops.settings import Settings, load_settings

BLOCKS_VARIABLE = "PRIVACY_OPS_BLOCKS"


@dataclass(frozen=True)
class Services:
    settings: Settings
    engine: Engine
    s3: Any  # botocore S3 client
    stripe: Any  # stripe.StripeClient
    datamap: DataMap

    @property
    def secret_key(self) -> str:
        return self.settings.secret_key.get_secret_value()

    @staticmethod
    def now() -> datetime:
        return datetime.now(UTC)


@functools.cache
def current_settings() -> Settings:
    block_name = os.environ.get(BLOCKS_VARIABLE)
    if block_name:
        from blocks.cellcms import settings_from_blocks

        return settings_from_blocks(block_name)
    return load_settings()


@functools.cache
def services() -> Services:
    """Build every client once per process; the lifecycle schema is created on first use."""
    from privacy_ops.stores import s3 as s3_store
    from privacy_ops.stores import stripe_store

    settings = current_settings()
    # hide_parameters: bound values (identifiers, redaction patterns) never appear in an SQL error message, which
    # would otherwise reach Prefect's state messages and logs.
    engine = create_engine(settings.database_url.get_secret_value(), pool_pre_ping=True, hide_parameters=True)
    with engine.begin() as connection:
        ensure_schema(connection)
    return Services(
        settings=settings,
        engine=engine,
        s3=s3_store.client(settings),
        stripe=stripe_store.client(settings),
        datamap=load_datamap(settings.datamap_path),
    )


def reset_cache() -> None:
    """Forget resolved settings and clients (tests switch stacks)."""
    services.cache_clear()
    current_settings.cache_clear()

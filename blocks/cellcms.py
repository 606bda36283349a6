"""Prefect blocks: one per external system, secrets stored encrypted by Prefect and masked in its API and UI.

For real deployments: set the environment variables once (README, "Configuration") and run
`privacy-ops blocks save --name prod`; workers then run with `PRIVACY_OPS_BLOCKS=prod` and need no other secret.
`settings_from_blocks` is the only place that turns blocks back into `Settings`.
"""

from __future__ import annotations

from typing import cast

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from privacy_ops.settings import Settings


class CellCMSDatabase(Block):
    """The CellCMS PostgreSQL database (also holds the privacy_ops schema)."""

    _block_type_name = "CellCMS Database"
    url: SecretStr = Field(description="postgresql+psycopg://user:password@host:5432/cellcms")


class CellCMSStorage(Block):
    """S3 (or an S3-compatible store): the versioned content bucket and the exports bucket."""

    _block_type_name = "CellCMS Storage"
    endpoint_url: str | None = Field(None, description="empty for AWS S3")
    region: str = "eu-central-1"
    access_key_id: str | None = None
    secret_access_key: SecretStr | None = None
    content_bucket: str = "cellcms-content"
    export_bucket: str = "cellcms-privacy-exports"


class StripeAccount(Block):
    """The Stripe account CellCMS bills through."""

    _block_type_name = "CellCMS Stripe Account"
    api_key: SecretStr
    api_base: str | None = Field(None, description="empty for api.stripe.com")


class SmtpServer(Block):
    """Where privacy emails are sent from."""

    _block_type_name = "CellCMS SMTP Server"
    host: str
    port: int = 587
    username: str | None = None
    password: SecretStr | None = None
    security: str = Field("starttls", description="none | starttls | ssl")
    mail_from: str = "privacy@cellcms.com"
    compliance_email: str = "compliance@cellcms.com"


class PrivacyOpsKeys(Block):
    """The key behind pseudonyms, audit subject hashes and encrypted task results. Never rotate it casually:
    pseudonyms of retained records and audit hashes are derived from it."""

    _block_type_name = "CellCMS Privacy Ops Keys"
    secret_key: SecretStr


BLOCK_TYPES: tuple[type[Block], ...] = (CellCMSDatabase, CellCMSStorage, StripeAccount, SmtpServer, PrivacyOpsKeys)


def save_blocks(settings: Settings, name: str) -> list[str]:
    """Save the current settings as blocks named `name`; returns the saved block slugs."""
    blocks: list[Block] = [
        CellCMSDatabase(url=settings.database_url),
        CellCMSStorage(
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            access_key_id=settings.s3_access_key_id,
            secret_access_key=settings.s3_secret_access_key,
            content_bucket=settings.content_bucket,
            export_bucket=settings.export_bucket,
        ),
        StripeAccount(api_key=settings.stripe_api_key, api_base=settings.stripe_api_base),
        SmtpServer(
            host=settings.smtp_host,
            port=settings.smtp_port,
            username=settings.smtp_username,
            password=settings.smtp_password,
            security=settings.smtp_security,
            mail_from=settings.mail_from,
            compliance_email=settings.compliance_email,
        ),
        PrivacyOpsKeys(secret_key=settings.secret_key),
    ]
    for block in blocks:
        block.save(name, overwrite=True)
    return [f"{block.get_block_type_slug()}/{name}" for block in blocks]


def settings_from_blocks(name: str) -> Settings:
    """Settings from the blocks saved under `name`."""
    # Prefect's `load` is `@async_dispatch`ed, typed as "instance or coroutine"; called from sync code it returns
    # the instance.
    database = cast(CellCMSDatabase, CellCMSDatabase.load(name))
    storage = cast(CellCMSStorage, CellCMSStorage.load(name))
    stripe = cast(StripeAccount, StripeAccount.load(name))
    smtp = cast(SmtpServer, SmtpServer.load(name))
    keys = cast(PrivacyOpsKeys, PrivacyOpsKeys.load(name))
    return Settings(
        database_url=database.url,
        s3_endpoint_url=storage.endpoint_url,
        s3_region=storage.region,
        s3_access_key_id=storage.access_key_id,
        s3_secret_access_key=storage.secret_access_key,
        content_bucket=storage.content_bucket,
        export_bucket=storage.export_bucket,
        stripe_api_key=stripe.api_key,
        stripe_api_base=stripe.api_base,
        smtp_host=smtp.host,
        smtp_port=smtp.port,
        smtp_username=smtp.username,
        smtp_password=smtp.password,
        smtp_security=smtp.security,
        mail_from=smtp.mail_from,
        compliance_email=smtp.compliance_email,
        secret_key=keys.secret_key,
    )

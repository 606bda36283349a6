"""Where every connection comes from: environment variables, else the running local stack.

One place knows the names of the settings. Real deployments set the environment variables (or save Prefect blocks
from them with `privacy-ops blocks save`, see `blocks/`); on a laptop `privacy-ops stack up` writes the addresses
of the embedded stand-ins to `$PRIVACY_OPS_HOME/stack.json`, which fills whatever the environment leaves unset.
A missing or malformed setting raises `ConfigError` with one line naming it; the CLI prints that line, no
traceback.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr

# Setting name -> (environment variable, description). The README's configuration table is generated from this.
ENVIRONMENT: dict[str, tuple[str, str]] = {
    "database_url": (
        "CELLCMS_DATABASE_URL",
        "CellCMS PostgreSQL, e.g. postgresql+psycopg://user:pw@host:5432/cellcms",
    ),
    "s3_endpoint_url": ("CELLCMS_S3_ENDPOINT_URL", "S3 endpoint; empty for AWS itself"),
    "s3_region": ("CELLCMS_S3_REGION", "S3 region (default eu-central-1)"),
    "s3_access_key_id": ("CELLCMS_S3_ACCESS_KEY_ID", "S3 access key id; empty to use the default AWS chain"),
    "s3_secret_access_key": ("CELLCMS_S3_SECRET_ACCESS_KEY", "S3 secret access key"),
    "content_bucket": (
        "CELLCMS_CONTENT_BUCKET",
        "versioned bucket holding CellCMS assets (default cellcms-content)",
    ),
    "export_bucket": ("PRIVACY_OPS_EXPORT_BUCKET", "bucket for access packages (default cellcms-privacy-exports)"),
    "stripe_api_key": ("STRIPE_API_KEY", "Stripe secret key"),
    "stripe_api_base": ("STRIPE_API_BASE", "Stripe API address; empty for api.stripe.com"),
    "smtp_host": ("SMTP_HOST", "SMTP server host"),
    "smtp_port": ("SMTP_PORT", "SMTP server port"),
    "smtp_username": ("SMTP_USERNAME", "SMTP user; empty for none"),
    "smtp_password": ("SMTP_PASSWORD", "SMTP password"),
    "smtp_security": ("SMTP_SECURITY", "none | starttls | ssl (default starttls)"),
    "mail_from": ("PRIVACY_OPS_MAIL_FROM", "sender of every email (default privacy@cellcms.com)"),
    "compliance_email": (
        "PRIVACY_OPS_COMPLIANCE_EMAIL",
        "compliance ops mailbox (default compliance@cellcms.com)",
    ),
    "secret_key": (
        "PRIVACY_OPS_SECRET_KEY",
        "key for pseudonyms, audit hashes and result encryption (>= 32 chars)",
    ),
    "datamap_path": ("PRIVACY_OPS_DATAMAP", "data map YAML (default datamap/cellcms.yaml)"),
}

HOME_VARIABLE = "PRIVACY_OPS_HOME"
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(Exception):
    """A setting is missing or malformed; the message names it in one line."""


class Settings(BaseModel):
    """Every connection and key the flows need, resolved once per process or flow run."""

    database_url: SecretStr
    s3_endpoint_url: str | None = None
    s3_region: str = "eu-central-1"
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None
    content_bucket: str = "cellcms-content"
    export_bucket: str = "cellcms-privacy-exports"
    stripe_api_key: SecretStr
    stripe_api_base: str | None = None
    smtp_host: str
    smtp_port: int
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_security: str = "starttls"
    mail_from: str = "privacy@cellcms.com"
    compliance_email: str = "compliance@cellcms.com"
    secret_key: SecretStr
    datamap_path: Path = PROJECT_ROOT / "datamap" / "cellcms.yaml"


def state_dir() -> Path:
    """The one project-local directory holding the local stack's data, logs and Prefect home."""
    return Path(os.environ.get(HOME_VARIABLE) or PROJECT_ROOT / ".privacy-ops").resolve()


def stack_file() -> Path:
    return state_dir() / "stack.json"


def read_stack_values() -> dict[str, Any]:
    """Settings published by a running local stack, or {} when none runs."""
    path = stack_file()
    if not path.exists():
        return {}
    return dict(json.loads(path.read_text())["settings"])


_REQUIRED = ("database_url", "stripe_api_key", "smtp_host", "smtp_port", "secret_key")


def load_settings(environ: dict[str, str] | None = None) -> Settings:
    """Resolve settings: environment first, then the local stack; raise ConfigError naming what is missing."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {k: v for k, v in read_stack_values().items() if v not in (None, "")}
    for name, (variable, _) in ENVIRONMENT.items():
        if env.get(variable):
            values[name] = env[variable]
    missing = [ENVIRONMENT[name][0] for name in _REQUIRED if name not in values]
    if missing:
        raise ConfigError(
            f"{', '.join(missing)} not set and no local stack is running: set them, or run `privacy-ops stack up`"
        )
    try:
        settings = Settings(**values)
    except ValueError as error:
        field = str(error).splitlines()[1].strip() if "\n" in str(error) else "?"
        raise ConfigError(f"{ENVIRONMENT.get(field, (field,))[0]} is malformed") from None
    _check(settings)
    return settings


def _check(settings: Settings) -> None:
    url = settings.database_url.get_secret_value()
    if not url.startswith("postgresql"):
        raise ConfigError("CELLCMS_DATABASE_URL must be a PostgreSQL URL (postgresql+psycopg://...)")
    if len(settings.secret_key.get_secret_value()) < 32:
        raise ConfigError("PRIVACY_OPS_SECRET_KEY must be at least 32 characters")
    if settings.smtp_security not in ("none", "starttls", "ssl"):
        raise ConfigError("SMTP_SECURITY must be one of none, starttls, ssl")
    if not settings.datamap_path.exists():
        raise ConfigError(f"PRIVACY_OPS_DATAMAP: no such file {settings.datamap_path}")

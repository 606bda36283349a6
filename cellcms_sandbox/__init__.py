"""The synthetic CellCMS the privacy flows act on in the demo and the tests.

- `schema`: the tables (SQLAlchemy Core), the source of truth; `migrations/`: the Alembic revisions creating them.
- `migrate(database_url)`: `alembic upgrade head`, idempotent.
- `seed_sandbox(...)`: generate accounts into PostgreSQL (COPY), S3 and Stripe; returns a `SeedReport`.
- `demo_subjects(database_url)`: accounts carrying every planted hard case (`hard_cases` lists them).

Flows and tasks never import this package: they know CellCMS only through `datamap/cellcms.yaml`.
Imports are lazy so that `import cellcms_sandbox.schema` stays cheap (no Faker, boto3 or Stripe).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cellcms_sandbox.database import migrate
    from cellcms_sandbox.generator import SandboxNotEmptyError, SeedReport, seed_sandbox
    from cellcms_sandbox.hard_cases import demo_subjects, hard_case_counts

__all__ = ["SandboxNotEmptyError", "SeedReport", "demo_subjects", "hard_case_counts", "migrate", "seed_sandbox"]

_HOMES = {
    "migrate": "cellcms_sandbox.database",
    "SandboxNotEmptyError": "cellcms_sandbox.generator",
    "SeedReport": "cellcms_sandbox.generator",
    "seed_sandbox": "cellcms_sandbox.generator",
    "demo_subjects": "cellcms_sandbox.hard_cases",
    "hard_case_counts": "cellcms_sandbox.hard_cases",
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'cellcms_sandbox' has no attribute {name!r}")

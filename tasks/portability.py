"""The portability (GDPR art. 20) and right-to-know (CCPA) steps: build the package, then check it read back.

Both packages are streamed into the exports bucket like the access package (privacy_ops.export) and handed out by
an expiring link; what goes in is decided by the data map (privacy_ops.portability).
"""

from __future__ import annotations

import tempfile
import zipfile
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Connection

from privacy_ops import checks, export
from privacy_ops.portability import (
    CATEGORIES_JSON,
    CATEGORIES_MD,
    FILES_DIRECTORY,
    OBSERVED_CATEGORIES,
    CategoryTally,
    PackageView,
    PortableTable,
    account_emails,
    categories_frame,
    categories_markdown,
    disclosed_categories,
    email_owner_frame,
    emails_in,
    manifest_frame,
    months_before,
    portability_manifest,
    portable_table,
    portable_tables,
    provided_view,
    read_package,
    subject_frame,
    window_frame,
)
from privacy_ops.services import Services
from privacy_ops.stores import postgres
from privacy_ops.stores import s3 as s3_store
from tasks.access import AccessPackage, add_access_summary, publish_package, write_subject_data
from tasks.checks import record_verdict
from tasks.lifecycle import Located, load_request
from tasks.step import step


@dataclass(frozen=True)
class KnowPackage(AccessPackage):
    """A right-to-know package: an access package of the disclosed period, plus the categories it lists."""

    categories: list[str]
    period_start: str  # ISO dates of the 12 months disclosed
    period_end: str


@step()
def build_portability_package(services: Services, request_id: str, account_ids: list[int]) -> AccessPackage:
    """The data the person provided (portable tables, their asset files as-is) with an import manifest."""
    datamap, s3 = services.datamap, services.s3
    tables: list[PortableTable] = []
    rows: dict[str, int] = {}
    files = 0
    with export.PackageWriter.for_settings(s3, services.settings, request_id, kind="portability") as package:
        with services.engine.connect() as connection:
            for name in portable_tables(datamap):
                table = provided_view(datamap, postgres.export_table(connection, datamap, name, account_ids))
                count = package.add_table(table.category, name, table.columns, table.rows, path=name)
                tables.append(portable_table(datamap, name, table.columns))
                if count:
                    rows[name] = count
        for location in datamap.s3.values():
            if location.category in OBSERVED_CATEGORIES:
                continue
            bucket = getattr(services.settings, location.bucket_setting)
            for account_id in account_ids:
                for version in s3_store.list_versions(s3, bucket, location.prefix.format(account_id=account_id)):
                    if version.is_latest and not version.is_delete_marker:
                        path = f"{FILES_DIRECTORY}/{version.key}"
                        package.add_s3_object(path, s3, bucket, version.key, category=location.category.value)
                        files += 1
        manifest = portability_manifest(request_id, package.generated_at, tables, package.entries)
        result = package.finish(manifest=manifest)
    return publish_package(
        services, request_id, result, outcome="portability_package_built", rows=rows, files=files
    )


@step()
def build_know_package(services: Services, request_id: str, account_ids: list[int]) -> KnowPackage:
    """The categories held (with sources, purposes and recipients) and the specific pieces collected in the 12
    months before the request was received."""
    datamap = services.datamap
    until = load_request(services, request_id).received_at
    since = months_before(until)
    tally = CategoryTally()
    with export.PackageWriter.for_settings(services.s3, services.settings, request_id, kind="know") as package:
        written = write_subject_data(
            services,
            package,
            account_ids,
            collected_since=since,
            view=lambda table: tally.view(datamap, table),
        )
        for category, count in written.files.items():
            tally.add(category, "files", count)
        if datamap.stripe is not None:
            tally.add(datamap.stripe.category.value, "stripe", len(written.stripe_summaries))
        categories = disclosed_categories(datamap, tally)
        package.add_json(
            CATEGORIES_JSON,
            {
                "request_id": request_id,
                "period": {"from": since.isoformat(), "to": until.isoformat()},
                "categories": categories,
            },
        )
        package.add_text(CATEGORIES_MD, categories_markdown(categories, since, until))
        add_access_summary(
            package,
            written,
            notes=[
                f"Records collected from {since:%Y-%m-%d} to {until:%Y-%m-%d} (the 12 months before your "
                "request); records without a collection date are included whole.",
                "categories.md lists each category of personal information with its sources, purposes and "
                "the parties it is shared with.",
            ],
        )
        result = package.finish()
    built = publish_package(
        services,
        request_id,
        result,
        outcome="know_package_built",
        rows=written.rows,
        files=sum(written.files.values()),
        mentions=written.mentions,
        stripe_customers=len(written.stripe_summaries),
    )
    return KnowPackage(
        **{name: getattr(built, name) for name in AccessPackage.__dataclass_fields__},
        categories=[str(c["category"]) for c in categories],
        period_start=since.date().isoformat(),
        period_end=until.date().isoformat(),
    )


@step(retries=0)
def check_portability_package(
    services: Services, request_id: str, package: AccessPackage, located: Located
) -> dict[str, Any]:
    """Read the package back: only the person's rows, their account values, and no other account's email."""
    datamap = services.datamap
    view = _read_back(services, package, {name: f"{name}.json" for name in portable_tables(datamap)})
    account_ids = set(located.account_ids)
    found = emails_in(view)
    with services.engine.connect() as connection:
        owners = account_emails(connection, datamap, {a for addresses in found.values() for a in addresses})
        on_file = _emails_on_file(connection, services, located.account_ids)
    result = checks.rights_package_checks(
        "portability_package",
        manifest_frame(datamap, view),
        account_ids,
        subject_rows=subject_frame(datamap, view),
        emails_on_file=on_file,
        email_owners=email_owner_frame(found, owners, account_ids),
    )
    return record_verdict(services, request_id, "portability_package", result)


@step(retries=0)
def check_know_package(
    services: Services, request_id: str, package: AccessPackage, located: Located
) -> dict[str, Any]:
    """Read the package back: only the person's rows, none collected before the period, every category held
    listed with its disclosure."""
    datamap = services.datamap
    paths = {name: f"{spec.category.value}/{name}.json" for name, spec in datamap.postgres.tables.items()}
    view = _read_back(services, package, paths)
    since = months_before(load_request(services, request_id).received_at)
    with services.engine.connect() as connection:
        on_file = _emails_on_file(connection, services, located.account_ids)
    result = checks.rights_package_checks(
        "know_package",
        manifest_frame(datamap, view),
        set(located.account_ids),
        subject_rows=subject_frame(datamap, view),
        emails_on_file=on_file,
        window=window_frame(datamap, view, since),
        categories=categories_frame(datamap, view),
    )
    return record_verdict(services, request_id, "know_package", result)


def _read_back(services: Services, package: AccessPackage, table_paths: dict[str, str]) -> PackageView:
    """The package's tables as uploaded (spooled to a temporary file: a package may be large)."""
    with tempfile.TemporaryFile() as spool:
        services.s3.download_fileobj(package.bucket, package.key, spool)
        spool.seek(0)
        with zipfile.ZipFile(spool) as archive:
            return read_package(archive, table_paths)


def _emails_on_file(connection: Connection, services: Services, account_ids: list[int]) -> set[str]:
    found = (postgres.subject_email(connection, services.datamap, account_id) for account_id in account_ids)
    return {email for email in found if email}


def completion_summary(package: AccessPackage) -> list[dict[str, Any]]:
    """'What we did' lines of the completion email."""
    lines: list[dict[str, Any]] = [
        {"store": "CellCMS database", "action": "copied", "count": sum(package.rows_per_table.values())},
        {"store": "Files", "action": "copied", "count": package.files},
    ]
    if package.stripe_customers:
        lines.append({"store": "Billing (Stripe)", "action": "copied", "count": package.stripe_customers})
    if isinstance(package, KnowPackage):
        lines.append(
            {
                "store": "Categories of personal information",
                "action": "described",
                "count": len(package.categories),
            }
        )
    return lines

"""S3 operations of the privacy flows: list every version under an account's prefix, purge them for good.

CellCMS keeps assets in a *versioned* bucket, where a plain delete only adds a delete marker and every older
version stays readable. Erasure therefore lists every version and delete marker under the prefix first and removes
each by its VersionId; it re-lists until nothing is left, because deleting while paginating loses objects (moto
removed 1000 of 1200 that way) and because other writers may add versions meanwhile. Versions under object lock or
a legal hold cannot be removed by design: they are reported as retained (a count, no keys), not as a failure.

Plain functions taking the client as a parameter; Prefect tasks wrap them. Errors surface as `StoreError` naming
the operation, the bucket and the prefix, never an object's full key (file names can be personal data).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NoReturn

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from privacy_ops.stores.errors import StoreError

if TYPE_CHECKING:
    from privacy_ops.settings import Settings

# boto3 clients are generated at run time; without boto3-stubs (not a dependency) `Any` is the honest type.
S3Client = Any

DELETE_BATCH = 1000  # DeleteObjects accepts at most 1000 keys per call
DEFAULT_PURGE_ATTEMPTS = 5
# Codes S3 (and moto) answer in DeleteObjects.Errors for a version protected by object lock or a legal hold.
# AccessDenied is also what a missing permission looks like, so each one is confirmed with head_object.
_LOCK_ERROR_CODES = frozenset({"AccessDenied"})


@dataclass(frozen=True, slots=True)
class ObjectVersion:
    """One version or delete marker of one key."""

    key: str
    version_id: str  # "null" for objects written before versioning was enabled
    is_delete_marker: bool
    size: int  # 0 for delete markers
    last_modified: datetime
    is_latest: bool


@dataclass(frozen=True, slots=True)
class PurgeResult:
    """What a purge removed and what it had to leave behind."""

    versions_deleted: int
    delete_markers_deleted: int
    retained: int  # versions under object lock / legal hold that stay, by design
    retained_keys: int  # distinct keys among them
    attempts: int  # list-then-delete rounds used (the last one finds nothing left to delete)


def client(settings: Settings) -> S3Client:
    """The one place that builds an S3 client from Settings (endpoint, region, static keys or default chain)."""
    secret = settings.s3_secret_access_key.get_secret_value() if settings.s3_secret_access_key else None
    # Path-style addressing for custom endpoints (moto, MinIO, Ceph): bucket names need not resolve in DNS.
    s3_config = {"addressing_style": "path"} if settings.s3_endpoint_url else {}
    return boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint_url or None,
        region_name=settings.s3_region,
        aws_access_key_id=settings.s3_access_key_id or None,
        aws_secret_access_key=secret,
        config=Config(
            signature_version="s3v4",  # presigned URLs valid up to 7 days need SigV4
            retries={"mode": "standard", "max_attempts": 5},
            s3=s3_config,
        ),
    )


def raise_store_error(operation: str, target: str, error: Exception) -> NoReturn:
    """Re-raise a botocore error as StoreError without its message (it may echo keys or parameters)."""
    if isinstance(error, ClientError):
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = error.response.get("Error", {}).get("Code")
        raise StoreError(f"s3: {operation} {target} failed: {status} {code}", status=status, code=code) from None
    raise StoreError(f"s3: {operation} {target} failed: {type(error).__name__}") from None


def describe_key(key: str) -> str:
    """A key as it may appear in an error: its folder only (asset ids), not the file name."""
    folder, _, _ = key.rpartition("/")
    return f"{folder}/…" if folder else "…"


def list_versions(s3: S3Client, bucket: str, prefix: str) -> list[ObjectVersion]:
    """Every version and delete marker under `prefix`, all pages collected before anything is returned."""
    versions: list[ObjectVersion] = []
    try:
        for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Versions", []):
                versions.append(
                    ObjectVersion(
                        key=item["Key"],
                        version_id=item.get("VersionId") or "null",
                        is_delete_marker=False,
                        size=int(item.get("Size", 0)),
                        last_modified=item["LastModified"],
                        is_latest=bool(item.get("IsLatest", False)),
                    )
                )
            for item in page.get("DeleteMarkers", []):
                versions.append(
                    ObjectVersion(
                        key=item["Key"],
                        version_id=item.get("VersionId") or "null",
                        is_delete_marker=True,
                        size=0,
                        last_modified=item["LastModified"],
                        is_latest=bool(item.get("IsLatest", False)),
                    )
                )
    except (ClientError, BotoCoreError) as error:
        raise_store_error("list versions", f"{bucket}/{prefix}", error)
    return versions


def purge_prefix(
    s3: S3Client, bucket: str, prefix: str, *, max_attempts: int = DEFAULT_PURGE_ATTEMPTS
) -> PurgeResult:
    """Permanently remove every version and delete marker under `prefix`; idempotent.

    Each round lists everything first, deletes it by VersionId in batches of 1000, and the next round's listing
    settles the count: what was sent and is gone was deleted. Versions refused with a lock error and confirmed to
    be locked are retained and not sent again. The purge ends when a listing holds nothing but retained versions,
    and fails with StoreError if `max_attempts` rounds were not enough.
    """
    _check_prefix(prefix)
    target = f"{bucket}/{prefix}"
    retained: set[tuple[str, str]] = set()
    sent: dict[tuple[str, str], ObjectVersion] = {}
    refused: list[dict[str, Any]] = []  # DeleteObjects Errors of the last round
    versions_deleted = markers_deleted = 0

    for attempt in range(1, max_attempts + 2):  # +1: the final listing that confirms the prefix is clean
        listing = {(v.key, v.version_id): v for v in list_versions(s3, bucket, prefix)}

        # Settle the previous round against this listing (not against DeleteObjects' answer, which moto gives
        # without VersionIds): what was sent and is gone was deleted.
        for ident, version in sent.items():
            if ident not in listing:
                if version.is_delete_marker:
                    markers_deleted += 1
                else:
                    versions_deleted += 1
        retained |= _confirm_locked(s3, bucket, target, refused, sent, listing)

        pending = [v for ident, v in listing.items() if ident not in retained]
        if not pending:
            kept = retained & listing.keys()  # a hold lifted and deleted meanwhile is no longer retained
            return PurgeResult(
                versions_deleted=versions_deleted,
                delete_markers_deleted=markers_deleted,
                retained=len(kept),
                retained_keys=len({key for key, _ in kept}),
                attempts=attempt,
            )
        if attempt > max_attempts:
            break
        sent = {(v.key, v.version_id): v for v in pending}
        refused = []
        for batch in _chunks(pending, DELETE_BATCH):
            refused.extend(_delete_batch(s3, bucket, target, batch))

    codes = sorted({str(error.get("Code")) for error in refused})
    raise StoreError(
        f"s3: purge {target} incomplete after {max_attempts} attempts: {len(pending)} versions remain "
        f"(last errors: {', '.join(codes) or 'none'})"
    )


def _check_prefix(prefix: str) -> None:
    # "accounts/1" would also match "accounts/12/...": an erasure prefix must be a whole folder.
    if not prefix or not prefix.endswith("/") or prefix == "/":
        raise ValueError("purge prefix must be a non-empty folder ending with '/'")


def _chunks(items: Sequence[ObjectVersion], size: int) -> Iterator[Sequence[ObjectVersion]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _delete_batch(s3: S3Client, bucket: str, target: str, batch: Iterable[ObjectVersion]) -> list[dict[str, Any]]:
    """Delete one batch by VersionId; return the per-object errors (the call itself failing raises)."""
    objects = [{"Key": v.key, "VersionId": v.version_id} for v in batch]
    try:
        # Quiet: only failures come back, which keeps 1000-object answers small.
        response = s3.delete_objects(Bucket=bucket, Delete={"Objects": objects, "Quiet": True})
    except (ClientError, BotoCoreError) as error:
        raise_store_error("delete objects", target, error)
    return list(response.get("Errors", []))


def _confirm_locked(
    s3: S3Client,
    bucket: str,
    target: str,
    refused: list[dict[str, Any]],
    sent: dict[tuple[str, str], ObjectVersion],
    listing: dict[tuple[str, str], ObjectVersion],
) -> set[tuple[str, str]]:
    """Versions refused with a lock code that are still there and really locked; raise on a plain AccessDenied."""
    if not refused:
        return set()
    locked: set[tuple[str, str]] = set()
    lock_refusals = [e for e in refused if e.get("Code") in _LOCK_ERROR_CODES]
    # Real S3 names the VersionId of a refused object; moto names only the key, so match every version of it
    # that was sent and survived.
    sent_by_key: dict[str, list[tuple[str, str]]] = {}
    for ident, version in sent.items():
        if not version.is_delete_marker and ident in listing:  # markers cannot be locked
            sent_by_key.setdefault(ident[0], []).append(ident)
    candidates = {
        ident
        for error in lock_refusals
        for ident in sent_by_key.get(str(error.get("Key")), [])
        if error.get("VersionId") in (None, "", ident[1])
    }
    for key, version_id in sorted(candidates):
        if not _is_locked(s3, bucket, key, version_id):
            # Refused without a lock: a permissions problem, not a retention. Erasure must not pass silently.
            raise StoreError(
                f"s3: delete object version in {bucket}/{describe_key(key)} denied without object lock",
                status=403,
                code="AccessDenied",
            )
        locked.add((key, version_id))
    return locked


def _is_locked(s3: S3Client, bucket: str, key: str, version_id: str) -> bool:
    """Whether a version is under a legal hold or an unexpired retention (GOVERNANCE or COMPLIANCE)."""
    try:
        # head_object, not get_object_retention: moto answers 500 for the latter (NOTES-stack.md).
        head = s3.head_object(Bucket=bucket, Key=key, VersionId=version_id)
    except (ClientError, BotoCoreError) as error:
        raise_store_error("head object version", f"{bucket}/{describe_key(key)}", error)
    if head.get("ObjectLockLegalHoldStatus") == "ON":
        return True
    until = head.get("ObjectLockRetainUntilDate")
    return bool(head.get("ObjectLockMode") and until and until > datetime.now(UTC))

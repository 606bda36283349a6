"""The sandbox's S3 side: a versioned content bucket holding each asset's versions.

Objects live under `accounts/{owner account id}/assets/{asset id}/{filename}` (the data map's `s3.content.prefix`),
each with every version the asset_versions table lists. Works against AWS S3 and moto alike (plain boto3 calls).
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import Executor, Future
from typing import Any

from botocore.exceptions import ClientError

from cellcms_sandbox.synthetic import AssetUpload

ACCOUNTS_PREFIX = "accounts/"


def ensure_versioned_bucket(s3: Any, bucket: str) -> None:
    """Create the bucket if missing and make sure versioning is enabled (erasure must find every version)."""
    try:
        s3.head_bucket(Bucket=bucket)
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
            raise
        region = s3.meta.region_name
        if region and region != "us-east-1":
            s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": region})
        else:
            s3.create_bucket(Bucket=bucket)
    if s3.get_bucket_versioning(Bucket=bucket).get("Status") != "Enabled":
        s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})


def has_objects(s3: Any, bucket: str, prefix: str = ACCOUNTS_PREFIX) -> bool:
    """Whether any object version or delete marker exists under the prefix."""
    page = s3.list_object_versions(Bucket=bucket, Prefix=prefix, MaxKeys=1)
    return bool(page.get("Versions") or page.get("DeleteMarkers"))


def delete_all_versions(s3: Any, bucket: str, prefix: str = ACCOUNTS_PREFIX) -> int:
    """Permanently delete every version and delete marker under the prefix; returns how many were removed.

    Lists everything first and deletes afterwards: deleting while paginating skips objects (seen with moto).
    Re-lists until nothing is left, in case objects were written meanwhile.
    """
    removed = 0
    while True:
        targets: list[dict[str, str]] = []
        for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=prefix):
            for entry in [*page.get("Versions", []), *page.get("DeleteMarkers", [])]:
                targets.append({"Key": entry["Key"], "VersionId": entry["VersionId"]})
        if not targets:
            return removed
        for start in range(0, len(targets), 1000):
            batch = targets[start : start + 1000]
            answer = s3.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
            if answer.get("Errors"):
                first = answer["Errors"][0]
                raise RuntimeError(f"S3 refused to delete {first.get('Key')}: {first.get('Code')}")
            removed += len(batch)


def _upload_versions(s3: Any, bucket: str, upload: AssetUpload) -> list[str]:
    # One asset's versions go up in order, so that the newest version is the current one.
    return [
        s3.put_object(Bucket=bucket, Key=upload.key, Body=content, ContentType=upload.content_type)["VersionId"]
        for content in upload.versions
    ]


def start_uploads(s3: Any, bucket: str, uploads: Iterable[AssetUpload], pool: Executor) -> list[Future[list[str]]]:
    """Start uploading every asset's versions in parallel (one task per asset); each future gives the version
    ids, oldest first. The caller does other work (Stripe) meanwhile and collects the results afterwards."""
    return [pool.submit(_upload_versions, s3, bucket, upload) for upload in uploads]

"""Publish a retention run's Great Expectations Data Docs to S3, for compliance ops to open.

GX 1.24.1 has no S3 store backend for Data Docs, so `checks.retention_checks(..., docs_dir=...)` builds the site
locally and `publish` uploads its HTML pages under `data-docs/<run_id>/` in the export bucket (SSE-S3, a
Content-Type per file). The bucket stays private, and a presigned URL covers one object only: relative links
between pages would not open. So `publish` also writes `data-docs/<run_id>/run.html`, a static page (no script)
listing each suite's status with a presigned link to its validation page, and returns that page's presigned URL.
GX's index page is not linked: it is filled by JavaScript from public CDNs. The validation pages render unstyled
offline (their CSS comes from CDNs too) but complete. `static/` (GX's logos and stylesheets, ~4 MB) is not
uploaded: nothing reachable through a presigned URL could load it.

Only the retention suite renders Data Docs: its pages show suite, column and query text (dates and the rules'
literals) with counts, no personal data.
"""

from __future__ import annotations

import html
import mimetypes
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError

from privacy_ops.checks import DocsPage
from privacy_ops.export import MAX_PRESIGN_DAYS, ExportError, _ensure_bucket
from privacy_ops.stores.s3 import S3Client

__all__ = ["PREFIX", "RUN_PAGE", "ExportError", "publish", "run_prefix"]

PREFIX = "data-docs/"
RUN_PAGE = "run.html"
_RUN_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_SKIPPED_DIRS = frozenset({"static"})


def run_prefix(run_id: str) -> str:
    """Where a run's pages live in the bucket: `data-docs/<run_id>/`."""
    if not _RUN_ID.fullmatch(run_id) or run_id in {".", ".."}:
        raise ValueError("run_id must be 1-64 letters, digits, '_', '.' or '-'")
    return f"{PREFIX}{run_id}/"


def publish(
    s3: S3Client,
    bucket: str,
    run_id: str,
    docs_dir: Path | str,
    pages: Sequence[DocsPage] | None = None,
    *,
    expires_days: int = MAX_PRESIGN_DAYS,
) -> str:
    """Upload the site built in `docs_dir` under `data-docs/<run_id>/` and return a presigned URL (valid
    `expires_days`) of the run page linking the validation pages.

    `pages` (CheckResult.docs_pages) gives each page's suite and status; without it the validation pages found
    under `validations/` are listed by path, without a status. Raises ExportError naming the operation and run.
    """
    if not 1 <= expires_days <= MAX_PRESIGN_DAYS:
        raise ValueError(f"expires_days must be between 1 and {MAX_PRESIGN_DAYS}")
    prefix = run_prefix(run_id)
    root = Path(docs_dir)
    if pages is None:
        found = sorted(p.relative_to(root).as_posix() for p in (root / "validations").rglob("*.html"))
        pages = [DocsPage(suite=path, success=False, path=path) for path in found]
        known_status = False
    else:
        known_status = True
    _ensure_bucket(s3, bucket, run_id)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = path.relative_to(root)
        if relative.parts[0] in _SKIPPED_DIRS:
            continue
        _put(s3, bucket, prefix + relative.as_posix(), path.read_bytes(), run_id)
    links = [(page, _presign(s3, bucket, prefix + page.path, expires_days, run_id)) for page in pages]
    _put(s3, bucket, prefix + RUN_PAGE, _run_page(run_id, links, known_status).encode(), run_id)
    return _presign(s3, bucket, prefix + RUN_PAGE, expires_days, run_id)


def _content_type(key: str) -> str:
    kind, _ = mimetypes.guess_type(key)
    kind = kind or "application/octet-stream"
    return f"{kind}; charset=utf-8" if kind.startswith("text/") or kind.endswith(("json", "javascript")) else kind


def _put(s3: S3Client, bucket: str, key: str, body: bytes, run_id: str) -> None:
    try:
        s3.put_object(
            Bucket=bucket, Key=key, Body=body, ContentType=_content_type(key), ServerSideEncryption="AES256"
        )
    except (ClientError, BotoCoreError) as error:
        raise ExportError(f"s3: upload data docs of run {run_id} failed: {type(error).__name__}") from None


def _presign(s3: S3Client, bucket: str, key: str, expires_days: int, run_id: str) -> str:
    try:
        url: str = s3.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=expires_days * 86400
        )
    except (ClientError, BotoCoreError):
        raise ExportError(f"s3: presign data docs of run {run_id} failed") from None
    return url


def _run_page(run_id: str, links: list[tuple[DocsPage, str]], known_status: bool) -> str:
    """A self-contained page: one row per suite, its status, a presigned link to its GX validation page."""
    failed = sum(not page.success for page, _ in links)
    verdict = ("all passed" if not failed else f"{failed} of {len(links)} FAILED") if known_status else ""
    rows = "\n".join(
        f'<tr><td><a href="{html.escape(url)}">{html.escape(page.suite)}</a></td>'
        f"<td>{('passed' if page.success else 'FAILED') if known_status else ''}</td></tr>"
        for page, url in links
    )
    title = html.escape(f"Nightly retention {run_id}: Great Expectations Data Docs")
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:.3em 1em;text-align:left}}</style></head>
<body><h1>{title}</h1>
<p>{len(links)} validation pages, {html.escape(verdict)}. Generated {generated}; links expire with this page's.</p>
<table><tr><th>Suite</th><th>Status</th></tr>
{rows}
</table></body></html>
"""

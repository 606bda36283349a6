"""Personal-data packages (access, portability, right to know): a ZIP streamed straight into S3.

`PackageWriter` writes the ZIP into a multipart upload: zipfile writes to a non-seekable stream (entries then
carry data descriptors), and that stream sends a part every 8 MiB. Nothing holds the whole package, a whole table
or a whole file in memory: table rows are encoded one at a time, S3 files are copied in 1 MiB chunks, and the CSV
copy of a table is spooled to an anonymous temporary file (memory up to 4 MiB, then disk) while its JSON is
written, because zipfile allows one open entry at a time and the rows can be iterated only once.

Layout of the access package (the default paths; `add_table(path=...)` places a table elsewhere):
    <category>/<table>.json    a JSON array of objects, one per row (the exact values)
    <category>/<table>.csv     the same rows for spreadsheets (cells that look like formulas are neutralised)
    <category>/files/...       S3 files (add_s3_object / add_stream), byte for byte
    <category>/<name>.json     other documents (add_json, add_text), e.g. billing/stripe.json
    summary.html               a readable overview by the privacy policy's categories
    manifest.json              every entry with its category, table, rows and paths (or the caller's own manifest)

Every entry's SHA-256 is computed while it is written (`ManifestEntry.sha256`), for manifests that list them.
The object is written with SSE-S3 (AES256) under `exports/{request_id}/{kind}-package-{request_id}.zip` (kind
"access", "portability", "know"); writing the same request's package again replaces it. On any error (or when
`finish()` is never reached) the multipart upload is aborted, so no half package is ever visible. Errors are
`ExportError`s naming the operation and the request id only.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import hashlib
import io
import json
import re
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, time
from decimal import Decimal
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address, IPv6Interface, IPv6Network
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, BinaryIO, Literal, NoReturn, Protocol
from uuid import UUID

import jinja2
from botocore.exceptions import BotoCoreError, ClientError

from privacy_ops.datamap.model import Category
from privacy_ops.pii import Pii
from privacy_ops.stores.errors import StoreError
from privacy_ops.stores.s3 import S3Client, describe_key

if TYPE_CHECKING:
    from privacy_ops.settings import Settings

MIB = 1024 * 1024
PART_SIZE = 8 * MIB  # S3 needs >= 5 MiB for every part but the last; 8 MiB keeps 10,000 parts = 78 GiB
COPY_CHUNK = 1 * MIB
CSV_SPOOL_IN_MEMORY = 4 * MIB
PREVIEW_ROWS = 20  # tables with at most this many rows are shown in full in summary.html
MANIFEST_PATH = "manifest.json"
MAX_PRESIGN_DAYS = 7  # SigV4 presigned URLs live at most 7 days
_ENCODE_BATCH = 256 * 1024  # characters of JSON/CSV text gathered before one write into the ZIP entry

_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_SAFE_KIND = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
_SAFE_SEGMENT = re.compile(r"^[^/\\\x00-\x1f]+$")
_PLAIN_NUMBER = re.compile(r"^[+-]?[\d\s().,-]*$")  # "+49 30 1234", "-12.5": not a formula
_FORMULA_START = frozenset("=+-@\t\r")
_PLAIN_TYPES = frozenset({str, int, float, bool, type(None)})  # written as they are: no conversion call per value

# The policy's section 1 names for the categories, in the policy's order; unknown categories follow.
CATEGORY_LABELS: dict[str, str] = {
    Category.account: "Account information",
    Category.billing: "Billing information",
    Category.content: "Content data",
    Category.communications: "Communications",
    Category.usage: "Usage data",
    Category.device: "Device information",
    Category.logs: "Log data",
    Category.cookies: "Cookies and preferences",
}

_TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("privacy_ops", "templates"),
    autoescape=True,  # every value in the summary is the person's data or CellCMS content: escape all of it
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


class ExportError(StoreError):
    """Building or uploading an access package failed; the message names the operation and request only."""


class _Body(Protocol):
    def read(self, amt: int | None = ..., /) -> bytes: ...


class _Writable(Protocol):
    def write(self, data: bytes, /) -> int: ...


class _Hashing:
    """Passes writes through to a ZIP entry and hashes them: the entry's SHA-256 without reading it back."""

    def __init__(self, entry: _Writable) -> None:
        self._entry = entry
        self._digest = hashlib.sha256()

    def write(self, data: bytes, /) -> int:
        self._digest.update(data)
        return self._entry.write(data)

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


@dataclass(frozen=True, slots=True)
class ManifestEntry:
    """One item of the package: a table (rows set), a file or a document."""

    kind: Literal["table", "file", "document"]
    category: str | None
    table: str | None  # the table's name for kind "table"
    rows: int | None  # row count for kind "table"
    paths: tuple[str, ...]  # entries in the ZIP
    size_bytes: int  # uncompressed bytes of the entries
    sha256: tuple[str, ...] = ()  # hex digest of each path's bytes, in the order of `paths`

    def described(self) -> dict[str, Any]:
        """The entry as the default manifest.json lists it (kind, category, table, rows, paths, size)."""
        data = asdict(self)
        data.pop("sha256")
        return data


@dataclass(frozen=True, slots=True)
class PackageResult:
    """The uploaded package."""

    bucket: str
    key: str
    size_bytes: int
    entries: list[ManifestEntry]
    parts: int  # multipart upload parts sent
    etag: str


@dataclass(slots=True)
class _TableSummary:
    category: str
    table: str
    columns: list[str]
    rows: int
    preview: list[list[Any]] = field(default_factory=list)  # only kept when rows <= PREVIEW_ROWS


def package_key(request_id: str, kind: str = "access") -> str:
    """Where the package of a request lives in the export bucket; `kind` names it (access, portability, know)."""
    _check_request_id(request_id)
    if not _SAFE_KIND.match(kind):
        raise ValueError("kind must be 1-32 lowercase letters, digits or '-'")
    return f"exports/{request_id}/{kind}-package-{request_id}.zip"


def presigned_url(s3: S3Client, bucket: str, key: str, expires_days: int = 7) -> str:
    """A GET link to the package, valid `expires_days` (1..7) days, downloading under the package's file name."""
    if not 1 <= expires_days <= MAX_PRESIGN_DAYS:
        raise ValueError(f"expires_days must be between 1 and {MAX_PRESIGN_DAYS}")
    filename = key.rpartition("/")[2]
    try:
        url: str = s3.generate_presigned_url(
            "get_object",
            Params={
                "Bucket": bucket,
                "Key": key,
                "ResponseContentDisposition": f'attachment; filename="{filename}"',
            },
            ExpiresIn=expires_days * 86400,
        )
    except (ClientError, BotoCoreError):
        raise ExportError(f"s3: presign {bucket}/{key} failed") from None
    return url


class _MultipartStream:
    """A write-only, non-seekable file that uploads itself to S3 as parts of at least `part_size` bytes.

    It deliberately has no tell()/seek(): zipfile then writes data descriptors instead of seeking back.
    """

    def __init__(self, s3: S3Client, bucket: str, key: str, request_id: str, part_size: int) -> None:
        self._s3 = s3
        self._bucket = bucket
        self._key = key
        self._request_id = request_id
        self._part_size = part_size
        self._buffer = bytearray()
        self._parts: list[dict[str, Any]] = []
        self.size = 0
        response = self._call(
            "create multipart upload",
            lambda: s3.create_multipart_upload(
                Bucket=bucket,
                Key=key,
                ContentType="application/zip",
                ServerSideEncryption="AES256",
                # Like boto3's own transfer manager: CRC32 on every part, listed again on completion.
                ChecksumAlgorithm="CRC32",
            ),
        )
        self.upload_id: str = response["UploadId"]

    @property
    def parts(self) -> int:
        return len(self._parts)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._buffer += data
        self.size += len(data)
        if len(self._buffer) >= self._part_size:
            self._send_part()
        return len(data)

    def flush(self) -> None:
        """Nothing to do: parts go out when full; zipfile calls this after each entry."""

    def close(self) -> None:
        """Nothing to do: `complete()` or `abort()` end the upload; zipfile never closes a file it was given."""

    def complete(self) -> str:
        """Send the last part and complete the upload; return the object's ETag."""
        if self._buffer or not self._parts:  # an upload needs at least one part, even a tiny one
            self._send_part()
        response = self._call(
            "complete multipart upload",
            lambda: self._s3.complete_multipart_upload(
                Bucket=self._bucket,
                Key=self._key,
                UploadId=self.upload_id,
                MultipartUpload={"Parts": self._parts},
            ),
        )
        return str(response.get("ETag", ""))

    def abort(self) -> None:
        # A failed abort is not raised over the original error; the next run for this request aborts leftovers
        # (PackageWriter.__init__).
        with contextlib.suppress(ClientError, BotoCoreError):
            self._s3.abort_multipart_upload(Bucket=self._bucket, Key=self._key, UploadId=self.upload_id)
        self._buffer = bytearray()

    def _send_part(self) -> None:
        number = len(self._parts) + 1
        # The bytearray itself is the body (no copy); a fresh one takes its place.
        body, self._buffer = self._buffer, bytearray()
        response = self._call(
            f"upload part {number}",
            lambda: self._s3.upload_part(
                Bucket=self._bucket,
                Key=self._key,
                UploadId=self.upload_id,
                PartNumber=number,
                Body=body,
                ChecksumAlgorithm="CRC32",
            ),
        )
        part: dict[str, Any] = {"PartNumber": number, "ETag": response["ETag"]}
        if response.get("ChecksumCRC32"):
            part["ChecksumCRC32"] = response["ChecksumCRC32"]
        self._parts.append(part)

    def _call(self, operation: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except (ClientError, BotoCoreError) as error:
            _raise_export(f"{operation} for", self._request_id, error)


class PackageWriter:
    """Streams one request's package into S3; use as a context manager and call `finish()`.

        with PackageWriter(s3, settings.export_bucket, request_id) as package:
            package.add_table("account", "accounts", columns, rows)
            package.add_s3_object("content/files/a.png", s3, settings.content_bucket, key, category="content")
            package.add_json("billing/stripe.json", stripe_summary, category="billing")
            package.add_summary_html(billing=stripe_summary)
            result = package.finish()

    Leaving the block without `finish()` (an exception, or an early return) aborts the upload.
    """

    def __init__(
        self,
        s3: S3Client,
        bucket: str,
        request_id: str,
        *,
        part_size: int = PART_SIZE,
        generated_at: datetime | None = None,
        kind: str = "access",
    ) -> None:
        if part_size < 5 * MIB:
            raise ValueError("part_size must be at least 5 MiB (S3's minimum for all parts but the last)")
        self.bucket = bucket
        self.key = package_key(request_id, kind)
        self.request_id = request_id
        self.generated_at = generated_at or datetime.now(UTC)
        self._s3 = s3
        self._entries: list[ManifestEntry] = []
        self._tables: list[_TableSummary] = []
        self._names: set[str] = {MANIFEST_PATH}  # written by finish()
        self._state: Literal["open", "finished", "aborted"] = "open"
        _ensure_bucket(s3, bucket, request_id)
        _abort_leftover_uploads(s3, bucket, self.key, request_id)
        self._stream = _MultipartStream(s3, bucket, self.key, request_id, part_size)
        try:
            # compresslevel 6: zlib's default balance; most of a package is JSON/CSV text that shrinks ~5-10x.
            self._zip = zipfile.ZipFile(
                self._stream,
                mode="w",
                compression=zipfile.ZIP_DEFLATED,
                compresslevel=6,
            )
        except BaseException:
            self._stream.abort()
            raise

    @classmethod
    def for_settings(
        cls, s3: S3Client, settings: Settings, request_id: str, *, kind: str = "access"
    ) -> PackageWriter:
        """A writer of a `kind` package (access, portability, know) into the configured export bucket."""
        return cls(s3, settings.export_bucket, request_id, kind=kind)

    @property
    def entries(self) -> list[ManifestEntry]:
        """What was written so far (a copy), e.g. to build a manifest of one's own for `finish(manifest=...)`."""
        return list(self._entries)

    # -------------------------------------------------------------------------------- context management

    def __enter__(self) -> PackageWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._state == "open":
            self.abort()

    def abort(self) -> None:
        """Drop the upload: nothing of this package becomes visible in S3."""
        if self._state != "open":
            return
        self._state = "aborted"
        self._stream.abort()

    # -------------------------------------------------------------------------------- content

    def add_table(
        self,
        category: str,
        table: str,
        columns: list[str],
        rows: Iterable[Sequence[Any]],
        *,
        path: str | None = None,
    ) -> int:
        """Write `<path>.json` and `<path>.csv` (default path `<category>/<table>`) from rows (iterated once);
        return the row count."""
        self._check_open()
        _check_segment(category, "category")
        _check_segment(table, "table")
        if len(set(columns)) != len(columns):
            raise ValueError(f"duplicate column names in table {table}")
        base = f"{category}/{table}" if path is None else path
        json_path, csv_path = f"{base}.json", f"{base}.csv"
        _check_path(json_path)
        self._reserve(json_path)
        self._reserve(csv_path)
        summary = _TableSummary(category, table, list(columns), rows=0)
        # Spooled, not kept: the CSV copy is written while the JSON is, and added to the ZIP afterwards.
        with (
            self._guard(f"write table {table}"),
            tempfile.SpooledTemporaryFile(max_size=CSV_SPOOL_IN_MEMORY, mode="w+b") as spool,
        ):
            csv_text = io.TextIOWrapper(spool, encoding="utf-8", newline="")
            csv_writer = csv.writer(csv_text)
            csv_writer.writerow(columns)
            with self._open_entry(json_path, force_zip64=True) as entry:
                json_entry = _Hashing(entry)
                json_bytes = self._write_json_rows(json_entry, columns, rows, csv_writer, summary)
            csv_text.flush()
            csv_text.detach()  # keep the spool open: TextIOWrapper would close it
            csv_bytes = spool.tell()
            spool.seek(0)
            with self._open_entry(csv_path, force_zip64=True) as entry:
                csv_entry = _Hashing(entry)
                _copy(spool, csv_entry)
        if summary.rows > PREVIEW_ROWS:
            summary.preview = []
        self._tables.append(summary)
        self._entries.append(
            ManifestEntry(
                "table",
                category,
                table,
                summary.rows,
                (json_path, csv_path),
                json_bytes + csv_bytes,
                (json_entry.hexdigest(), csv_entry.hexdigest()),
            )
        )
        return summary.rows

    def add_json(self, path: str, obj: Any, *, category: str | None = None) -> None:
        """Write one (small) JSON document, e.g. `billing/stripe.json`."""
        self._check_open()
        _check_path(path)
        self._reserve(path)
        data = json.dumps(obj, indent=2, ensure_ascii=False, default=_json_value).encode()
        self._write_document(path, data, category)

    def add_text(self, path: str, text: str, *, category: str | None = None) -> None:
        """Write one (small) UTF-8 text document, e.g. a Markdown overview."""
        self._check_open()
        _check_path(path)
        self._reserve(path)
        self._write_document(path, text.encode(), category)

    def _write_document(self, path: str, data: bytes, category: str | None) -> None:
        with self._guard(f"write document for {category or 'package'}"), self._open_entry(path) as entry:
            entry.write(data)
        digest = hashlib.sha256(data).hexdigest()
        self._entries.append(ManifestEntry("document", category, None, None, (path,), len(data), (digest,)))

    def add_stream(
        self, path: str, fileobj: _Body | BinaryIO, *, category: str | None = None, size: int | None = None
    ) -> int:
        """Copy a readable binary stream (e.g. an S3 object's Body) into the ZIP in chunks; return its bytes.

        `size`, when known, lets zipfile choose ZIP64 headers for files over 2 GiB.
        """
        self._check_open()
        _check_path(path)
        self._reserve(path)
        with self._guard(f"copy file for {category or 'package'}"), self._open_entry(path, size=size) as entry:
            hashing = _Hashing(entry)
            copied = _copy(fileobj, hashing)
        self._entries.append(ManifestEntry("file", category, None, None, (path,), copied, (hashing.hexdigest(),)))
        return copied

    def add_s3_object(self, path: str, s3: S3Client, bucket: str, key: str, *, category: str | None = None) -> int:
        """Copy one S3 object (its current version) into the package at `path`, streaming its Body."""
        self._check_open()
        try:
            response = s3.get_object(Bucket=bucket, Key=key)
        except (ClientError, BotoCoreError) as error:
            # Nothing was written yet: the package stays usable, the caller decides (e.g. skip a missing file).
            _raise_export(f"get object {bucket}/{describe_key(key)} for", self.request_id, error)
        body = response["Body"]
        try:
            return self.add_stream(path, body, category=category, size=int(response.get("ContentLength") or 0))
        finally:
            body.close()

    def add_summary_html(
        self,
        *,
        billing: Mapping[str, Any] | None = None,
        title: str = "Your personal data at CellCMS",
        notes: Sequence[str] = (),
        path: str = "summary.html",
    ) -> None:
        """Write a readable overview: category -> tables -> row counts (small tables' rows too), files, billing.

        Call it after the tables and files were added. `billing` is `stripe_store.customer_summary(...)`'s result;
        `notes` are extra sentences (e.g. what is retained under which legal basis). Everything is HTML-escaped.
        """
        self._check_open()
        _check_path(path)
        html = _TEMPLATES.get_template("access_summary.html").render(
            title=title,
            request_id=self.request_id,
            generated_at=self.generated_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            categories=self._summary_categories(),
            billing=_billing_view(billing),
            notes=list(notes),
        )
        self._reserve(path)
        data = html.encode()
        with self._guard("write summary"), self._open_entry(path) as entry:
            entry.write(data)
        digest = hashlib.sha256(data).hexdigest()
        self._entries.append(ManifestEntry("document", None, None, None, (path,), len(data), (digest,)))

    def finish(self, manifest: Mapping[str, Any] | None = None) -> PackageResult:
        """Add manifest.json, close the ZIP and complete the upload; the package is then visible in S3.

        The default manifest lists the request, the time and every entry (`ManifestEntry.described()`); a package
        with a format of its own (portability) passes its `manifest` document instead.
        """
        self._check_open()
        if manifest is None:
            manifest = {
                "request_id": self.request_id,
                "generated_at": self.generated_at.astimezone(UTC).isoformat(),
                "entries": [entry.described() for entry in self._entries],
            }
        # Written into the ZIP but not listed in the entries: the manifest describes the package's content.
        data = json.dumps(manifest, indent=2, ensure_ascii=False, default=_json_value).encode()
        with self._guard("close package"):
            with self._open_entry(MANIFEST_PATH) as entry:
                entry.write(data)
            self._zip.close()  # writes the central directory into the stream
            etag = self._stream.complete()
        self._state = "finished"
        return PackageResult(
            bucket=self.bucket,
            key=self.key,
            size_bytes=self._stream.size,
            entries=list(self._entries),
            parts=self._stream.parts,
            etag=etag,
        )

    # -------------------------------------------------------------------------------- internals

    def _write_json_rows(
        self,
        entry: _Writable,
        columns: list[str],
        rows: Iterable[Sequence[Any]],
        csv_writer: Any,
        summary: _TableSummary,
    ) -> int:
        """Stream rows as a JSON array (one object per line) into `entry` and as CSV into `csv_writer`.

        Each value is converted once (datetimes, addresses, ...) and used for both files. Text and CSV rows are
        gathered in small batches so that the ZIP entry and the CSV writer see few, larger writes.
        Returns the JSON's bytes.
        """
        written = 0
        pending: list[str] = ["["]
        pending_chars = 1
        csv_batch: list[list[Any]] = []
        width = len(columns)
        encode = _ROW_ENCODER.encode
        for row in rows:
            if len(row) != width:
                raise ValueError(f"row {summary.rows} of table {summary.table} has {len(row)} values, not {width}")
            values = [v if type(v) in _PLAIN_TYPES else _normalise(v) for v in row]
            text = encode(dict(zip(columns, values, strict=True)))
            pending.append(("\n" if summary.rows == 0 else ",\n") + text)
            pending_chars += len(text) + 2
            csv_batch.append([_csv_cell(v) for v in values])
            if summary.rows <= PREVIEW_ROWS:  # one more than shown tells "too many to show"
                summary.preview.append([_display(v) for v in values])
            summary.rows += 1
            if pending_chars >= _ENCODE_BATCH:
                written += entry.write("".join(pending).encode())
                csv_writer.writerows(csv_batch)
                pending, pending_chars, csv_batch = [], 0, []
        pending.append("\n]\n")
        written += entry.write("".join(pending).encode())
        csv_writer.writerows(csv_batch)
        return written

    def _open_entry(self, path: str, *, force_zip64: bool = False, size: int | None = None) -> IO[bytes]:
        info = zipfile.ZipInfo(path, date_time=self.generated_at.astimezone(UTC).timetuple()[:6])
        info.compress_type = zipfile.ZIP_DEFLATED
        info.external_attr = 0o644 << 16  # readable files once unzipped
        if size is not None:
            info.file_size = size
        return self._zip.open(info, mode="w", force_zip64=force_zip64)

    def _summary_categories(self) -> list[dict[str, Any]]:
        by_category: dict[str, dict[str, Any]] = {}
        for table in self._tables:
            group = by_category.setdefault(table.category, {"tables": [], "files": [], "documents": []})
            group["tables"].append(table)
        for entry in self._entries:
            if entry.kind in ("file", "document") and entry.category:
                group = by_category.setdefault(entry.category, {"tables": [], "files": [], "documents": []})
                group["files" if entry.kind == "file" else "documents"].append(entry)
        order = list(CATEGORY_LABELS)
        ranked = sorted(by_category, key=lambda c: (order.index(c) if c in order else len(order), c))
        return [
            {
                "id": name,
                "label": CATEGORY_LABELS.get(name, name.replace("_", " ").capitalize()),
                "tables": by_category[name]["tables"],
                "files": by_category[name]["files"],
                "documents": by_category[name]["documents"],
                "file_bytes": sum(e.size_bytes for e in by_category[name]["files"]),
                "preview_limit": PREVIEW_ROWS,
            }
            for name in ranked
        ]

    def _reserve(self, path: str) -> None:
        if path in self._names:
            raise ValueError(f"the package already has an entry {path}")
        self._names.add(path)

    def _check_open(self) -> None:
        if self._state != "open":
            raise RuntimeError(f"package {self.request_id} is {self._state}")

    def _guard(self, operation: str) -> _AbortOnError:
        return _AbortOnError(self, operation)


class _AbortOnError:
    """Abort the upload on any error inside; re-raise store errors as ExportError without their message."""

    def __init__(self, writer: PackageWriter, operation: str) -> None:
        self._writer = writer
        self._operation = operation

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            return
        self._writer.abort()
        if isinstance(exc, ClientError | BotoCoreError):
            _raise_export(f"{self._operation} of", self._writer.request_id, exc)
        # Other errors (ValueError from a bad row, ExportError from a part upload) propagate unchanged:
        # their messages are built here from names and counts, not from values.


def _raise_export(operation: str, request_id: str, error: BaseException) -> NoReturn:
    if isinstance(error, ClientError):
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = error.response.get("Error", {}).get("Code")
        raise ExportError(
            f"s3: {operation} package {request_id} failed: {status} {code}", status=status, code=code
        ) from None
    raise ExportError(f"s3: {operation} package {request_id} failed: {type(error).__name__}") from None


def _ensure_bucket(s3: S3Client, bucket: str, request_id: str) -> None:
    """Create the export bucket when it does not exist (first run on a fresh stack)."""
    try:
        s3.head_bucket(Bucket=bucket)
        return
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
            _raise_export(f"check bucket {bucket} for", request_id, error)
    except BotoCoreError as error:
        _raise_export(f"check bucket {bucket} for", request_id, error)
    region = s3.meta.region_name
    kwargs: dict[str, Any] = {"Bucket": bucket}
    if region and region != "us-east-1":  # us-east-1 rejects an explicit LocationConstraint
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
    try:
        s3.create_bucket(**kwargs)
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou",):
            _raise_export(f"create bucket {bucket} for", request_id, error)
    except BotoCoreError as error:
        _raise_export(f"create bucket {bucket} for", request_id, error)


def _abort_leftover_uploads(s3: S3Client, bucket: str, key: str, request_id: str) -> None:
    """Abort unfinished uploads of this package left by a crashed run (their parts hold personal data)."""
    try:
        for page in s3.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=key):
            for upload in page.get("Uploads", []):
                if upload.get("Key") == key:
                    s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload["UploadId"])
    except (ClientError, BotoCoreError) as error:
        _raise_export("abort leftover uploads of", request_id, error)


def _copy(source: _Body | IO[bytes] | BinaryIO, target: _Writable) -> int:
    copied = 0
    while chunk := source.read(COPY_CHUNK):
        target.write(chunk)
        copied += len(chunk)
    return copied


def _check_request_id(request_id: str) -> None:
    if not _SAFE_REQUEST_ID.match(request_id or ""):
        raise ValueError("request_id must be 1-64 letters, digits, '_' or '-'")


def _check_segment(value: str, what: str) -> None:
    if not value or value in (".", "..") or not _SAFE_SEGMENT.match(value):
        raise ValueError(f"{what} must be a plain name (no '/', no control characters)")


def _check_path(path: str) -> None:
    """Entry paths are relative and stay inside the package when unzipped (no zip-slip)."""
    if not path or path.startswith("/") or "\\" in path:
        raise ValueError("package paths must be relative and use '/'")
    for segment in path.split("/"):
        _check_segment(segment, "path segment")


def _json_value(value: Any) -> Any:
    """JSON for the types PostgreSQL rows carry; everything else is refused (by type name, not value)."""
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)  # exact, unlike a float
    if isinstance(
        value, UUID | IPv4Address | IPv6Address | IPv4Interface | IPv6Interface | IPv4Network | IPv6Network
    ):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode()
    if isinstance(value, set | frozenset):
        return sorted(value, key=str)
    if isinstance(value, Pii):
        return value.reveal()  # the package is the subject's own copy of their data
    raise TypeError(f"cannot export a value of type {type(value).__name__}")


# One encoder for all rows: json.dumps(default=...) would build a new encoder for every row.
_ROW_ENCODER = json.JSONEncoder(ensure_ascii=False, default=_json_value)


def _normalise(value: Any) -> Any:
    """A row value as JSON-ready data: containers stay (JSONB), everything else becomes a primitive."""
    if isinstance(value, dict | list | tuple):
        return value
    return _json_value(value)


def _csv_cell(value: Any) -> Any:
    """A normalised value as a CSV cell."""
    kind = type(value)
    if kind is str:
        # Spreadsheets run cells starting with = + - @ as formulas (CSV injection), and content written by
        # anyone lands here. A leading apostrophe makes such a cell text; phone and signed numbers stay as is.
        if value and value[0] in _FORMULA_START and not (value[0] in "+-" and _PLAIN_NUMBER.match(value)):
            return "'" + value
        return value
    if kind is int or kind is float:
        return value
    if value is None:
        return ""
    if kind is bool:
        return "true" if value else "false"
    return json.dumps(value, ensure_ascii=False, default=_json_value)  # JSONB containers


def _display(value: Any) -> str:
    """A cell as text for the HTML preview (escaped by the template)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, ensure_ascii=False, default=_json_value)
    if isinstance(value, bool | int | float):
        return json.dumps(value)
    return str(_json_value(value))


def _billing_view(billing: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The parts of a Stripe customer summary the HTML shows; cards only as brand, last 4 and expiry."""
    if not billing:
        return None
    customer = dict(billing.get("customer") or {})
    address = customer.get("address")
    address_text = ", ".join(str(v) for v in address.values() if v) if isinstance(address, Mapping) else ""
    cards = [
        {
            "brand": card.get("brand") or "",
            "last4": card.get("last4") or "",
            "expires": f"{card.get('exp_month') or 0:02d}/{card.get('exp_year') or ''}",
        }
        for card in billing.get("payment_methods") or []
    ]
    return {
        "customer": [
            ("Customer id", customer.get("id") or ""),
            ("Name", customer.get("name") or ""),
            ("Email", customer.get("email") or ""),
            ("Phone", customer.get("phone") or ""),
            ("Address", address_text),
            ("Customer since", customer.get("created") or ""),
        ],
        "cards": cards,
        "invoices": [
            {
                "id": invoice.get("id") or "",
                "number": invoice.get("number") or "",
                "created": invoice.get("created") or "",
                "amount_due": _money(invoice.get("amount_due"), invoice.get("currency")),
                "amount_paid": _money(invoice.get("amount_paid"), invoice.get("currency")),
                "status": invoice.get("status") or "",
            }
            for invoice in billing.get("invoices") or []
        ],
    }


# Stripe amounts are in the currency's minor unit, except for these zero-decimal currencies.
_ZERO_DECIMAL = frozenset({"bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga"}) | frozenset(
    {"pyg", "rwf", "ugx", "vnd", "vuv", "xaf", "xof", "xpf"}
)


def _money(amount: Any, currency: Any) -> str:
    if amount is None or amount == "":
        return ""
    code = str(currency or "").lower()
    if code in _ZERO_DECIMAL:
        return f"{int(amount)} {code.upper()}"
    return f"{int(amount) / 100:.2f} {code.upper()}".strip()

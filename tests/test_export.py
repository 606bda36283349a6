"""Integration tests of privacy_ops.export (the access package) against the stack's real moto and localstripe.

Fixtures (`stack`, `settings`, `s3`, `stripe_client`, `reset_services`) come from tests/conftest.py.
The large test builds a 200,000-row table plus a 20 MiB S3 file (~10 s on 2 cores) while a thread samples the
process's resident memory, and records the numbers as test properties (`--junitxml`) and on stdout (`-s`).
tracemalloc would measure Python allocations more precisely, but under pytest it slowed this build ~11x (87 s).
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import json
import os
import threading
import time
import urllib.request
import uuid
import zipfile
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import stripe

from privacy_ops.export import MIB, ExportError, PackageWriter, package_key, presigned_url
from privacy_ops.settings import Settings
from privacy_ops.stores import stripe_store

pytestmark = pytest.mark.usefixtures("reset_services")

COLUMNS = ["id", "path", "viewed_at", "session_id", "score", "note"]
START = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def _rows(count: int) -> Iterator[tuple[Any, ...]]:
    """Deterministic page-view rows, generated lazily: the test holds none of them."""
    for i in range(count):
        note = None if i % 7 else f"note {i} – ünïcode"
        yield (i, f"/projects/{i % 311}/docs/{i}", START + dt.timedelta(seconds=i), f"s-{i % 97}", i / 4, note)


def _expected_json(row: tuple[Any, ...]) -> dict[str, Any]:
    values = list(row)
    values[2] = values[2].isoformat()
    return dict(zip(COLUMNS, values, strict=True))


def _bucket(s3: Any) -> str:
    name = f"test-{uuid.uuid4().hex[:12]}"
    region = s3.meta.region_name
    config = {} if region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": region}}
    s3.create_bucket(Bucket=name, **config)
    return name


def _download(s3: Any, bucket: str, key: str) -> zipfile.ZipFile:
    return zipfile.ZipFile(io.BytesIO(s3.get_object(Bucket=bucket, Key=key)["Body"].read()))


def _request_id() -> str:
    return f"req_{uuid.uuid4().hex[:10]}"


class _PeakResidentMemory:
    """Samples this process's resident set size every 20 ms; `peak_delta` = peak minus the size at entry.

    An upper bound of what the code under test holds: RSS also counts memory freed but kept by the allocator.
    """

    _STATM = "/proc/self/statm"

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self.baseline = self.peak = 0

    @classmethod
    def available(cls) -> bool:
        return os.path.exists(cls._STATM)

    def _rss(self) -> int:
        with open(self._STATM) as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> _PeakResidentMemory:
        self.baseline = self.peak = self._rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def peak_delta(self) -> int:
        return self.peak - self.baseline


def test_large_package_streams_multipart_and_round_trips(
    s3: Any, settings: Settings, record_property: Callable[[str, object], None]
) -> None:
    content = _bucket(s3)
    blob = os.urandom(20 * MIB)  # random: deflate cannot shrink it, so the package is > 20 MiB
    digest = hashlib.sha256(blob).hexdigest()
    s3.put_object(Bucket=content, Key="accounts/7/assets/1/video.bin", Body=blob)
    del blob
    request_id = _request_id()

    started = time.perf_counter()
    with _PeakResidentMemory() as memory, PackageWriter.for_settings(s3, settings, request_id) as package:
        rows = package.add_table("usage", "page_views", COLUMNS, _rows(200_000))
        package.add_s3_object(
            "content/files/assets/1/video.bin", s3, content, "accounts/7/assets/1/video.bin", category="content"
        )
        package.add_summary_html()
        result = package.finish()
    seconds = time.perf_counter() - started

    measured = {
        "package_mib": round(result.size_bytes / MIB, 1),
        "table_json_and_csv_mib": round(result.entries[0].size_bytes / MIB, 1),
        "parts": result.parts,
        "build_seconds": round(seconds, 1),
        "peak_rss_increase_mib": round(memory.peak_delta / MIB, 1),
    }
    for name, value in measured.items():
        record_property(name, value)
    print(f"\naccess package measurements: {measured}")

    assert rows == 200_000
    assert result.bucket == settings.export_bucket and result.key == package_key(request_id)
    assert result.size_bytes > 20 * MIB and result.parts >= 3
    # Bounded: one 8 MiB part buffer (plus the part in flight), zlib and 1 MiB copy buffers, a 4 MiB CSV spool:
    # ~15 MiB measured. Holding the package (26 MiB), the table (JSON+CSV ~40 MiB) or the file (20 MiB) cannot fit.
    if _PeakResidentMemory.available():
        assert memory.peak_delta < 40 * MIB, measured

    head = s3.head_object(Bucket=result.bucket, Key=result.key)
    assert head["ETag"].strip('"').endswith(f"-{result.parts}")  # S3's mark of a multipart object
    assert head["ServerSideEncryption"] == "AES256"
    assert head["ContentLength"] == result.size_bytes

    archive = _download(s3, result.bucket, result.key)
    assert archive.testzip() is None
    assert archive.namelist() == [
        "usage/page_views.json",
        "usage/page_views.csv",
        "content/files/assets/1/video.bin",
        "summary.html",
        "manifest.json",
    ]
    with archive.open("usage/page_views.json") as stream:
        exported = json.load(stream)
    assert exported == [_expected_json(row) for row in _rows(200_000)]
    del exported
    with archive.open("usage/page_views.csv") as stream:
        reader = csv.reader(io.TextIOWrapper(stream, encoding="utf-8", newline=""))
        assert next(reader) == COLUMNS
        assert next(reader) == ["0", "/projects/0/docs/0", START.isoformat(), "s-0", "0.0", "note 0 – ünïcode"]
        assert sum(1 for _ in reader) == 199_999
    with archive.open("content/files/assets/1/video.bin") as stream:
        assert hashlib.sha256(stream.read()).hexdigest() == digest

    manifest = json.loads(archive.read("manifest.json"))
    assert manifest["entries"][0] == {
        "kind": "table",
        "category": "usage",
        "table": "page_views",
        "rows": 200_000,
        "paths": ["usage/page_views.json", "usage/page_views.csv"],
        "size_bytes": result.entries[0].size_bytes,
    }
    assert [(e.kind, e.category, e.table, e.rows, e.paths[0]) for e in result.entries] == [
        ("table", "usage", "page_views", 200_000, "usage/page_views.json"),
        ("file", "content", None, None, "content/files/assets/1/video.bin"),
        ("document", None, None, None, "summary.html"),
    ]
    assert len(manifest["entries"]) == len(result.entries)
    summary = archive.read("summary.html").decode()
    assert "page_views" in summary and "200000 records" in summary and "Too many records" in summary


def test_summary_shows_last4_escapes_values_and_neutralises_formulas(
    s3: Any, stripe_client: stripe.StripeClient
) -> None:
    customer = stripe_client.v1.customers.create({"email": "ann@example.com", "name": "Ann <b>Lee</b>"})
    method = stripe_client.v1.payment_methods.create(
        {"type": "card", "card": {"number": "4242424242424242", "exp_month": 4, "exp_year": 2030, "cvc": "123"}}
    )
    stripe_client.v1.payment_methods.attach(method.id, {"customer": customer.id})
    billing = stripe_store.customer_summary(stripe_client, customer.id)
    bucket = _bucket(s3)
    request_id = _request_id()

    with PackageWriter(s3, bucket, request_id) as package:
        package.add_table(
            "account",
            "accounts",
            ["id", "email", "full_name", "phone", "created_at"],
            [(42, "ann@example.com", "<script>alert('x')</script>", "+49 30 1234", START)],
        )
        package.add_table("content", "documents", ["id", "title"], [(1, '=HYPERLINK("http://evil")')])
        package.add_json("billing/stripe.json", billing, category="billing")
        package.add_summary_html(billing=billing, notes=["Invoices are kept for 7 years <tax law>."])
        result = package.finish()

    archive = _download(s3, bucket, result.key)
    summary = archive.read("summary.html").decode()
    assert "•••• 4242" in summary and "04/2030" in summary
    assert "4242424242424242" not in summary
    assert "4242424242424242" not in archive.read("billing/stripe.json").decode()
    assert "<script>" not in summary and "&lt;script&gt;" in summary
    assert "Ann &lt;b&gt;Lee&lt;/b&gt;" in summary and "&lt;tax law&gt;" in summary
    # Categories appear in the policy's order, with the policy's names.
    headings = [summary.index(f"<h2>{name}</h2>") for name in ("Account information", "Billing information")]
    assert headings == sorted(headings) and summary.index("<h2>Content data</h2>") > headings[-1]
    # The JSON keeps the exact value; the CSV cell is neutralised for spreadsheets; a phone number is left alone.
    assert json.loads(archive.read("content/documents.json")) == [{"id": 1, "title": '=HYPERLINK("http://evil")'}]
    assert archive.read("content/documents.csv").decode().splitlines()[1] == '1,"\'=HYPERLINK(""http://evil"")"'
    assert "+49 30 1234" in archive.read("account/accounts.csv").decode().splitlines()[1].split(",")


def test_presigned_url_downloads_the_package_over_http(s3: Any) -> None:
    bucket = _bucket(s3)
    with PackageWriter(s3, bucket, _request_id()) as package:
        package.add_json("account/profile.json", {"plan": "pro"}, category="account")
        result = package.finish()

    url = presigned_url(s3, result.bucket, result.key, expires_days=7)
    assert "X-Amz-Expires=604800" in url
    with urllib.request.urlopen(url, timeout=30) as response:
        body = response.read()
        disposition = response.headers["Content-Disposition"]
    assert zipfile.ZipFile(io.BytesIO(body)).read("account/profile.json") == b'{\n  "plan": "pro"\n}'
    assert disposition == f'attachment; filename="{result.key.rpartition("/")[2]}"'
    with pytest.raises(ValueError):
        presigned_url(s3, result.bucket, result.key, expires_days=8)


def test_a_failure_aborts_the_upload_and_leaves_no_package(s3: Any) -> None:
    bucket = _bucket(s3)
    request_id = _request_id()

    def rows_then_crash() -> Iterator[tuple[int, str]]:
        for i in range(100_000):  # ~2 parts in, then the database connection "drops"
            yield i, "x" * 200
        raise ConnectionError("connection lost")

    with pytest.raises(ConnectionError), PackageWriter(s3, bucket, request_id, part_size=5 * MIB) as package:
        package.add_table("usage", "page_views", ["id", "text"], rows_then_crash())

    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount") == 0
    with pytest.raises(RuntimeError):
        package.add_json("x.json", {})


def test_leaving_without_finish_aborts(s3: Any) -> None:
    bucket = _bucket(s3)
    with PackageWriter(s3, bucket, _request_id()) as package:
        package.add_json("account/profile.json", {"plan": "pro"})
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount") == 0


def test_writing_the_same_request_again_replaces_the_package(s3: Any) -> None:
    bucket = _bucket(s3)
    request_id = _request_id()
    # A crashed earlier run left an unfinished upload of this package behind.
    stale = s3.create_multipart_upload(Bucket=bucket, Key=package_key(request_id))["UploadId"]
    for version in (1, 2):
        with PackageWriter(s3, bucket, request_id) as package:
            package.add_json("account/profile.json", {"version": version})
            result = package.finish()

    listing = s3.list_objects_v2(Bucket=bucket)["Contents"]
    assert [item["Key"] for item in listing] == [result.key]
    assert json.loads(_download(s3, bucket, result.key).read("account/profile.json")) == {"version": 2}
    assert stale not in [u["UploadId"] for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


def test_export_bucket_is_created_when_missing(s3: Any) -> None:
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    with PackageWriter(s3, bucket, _request_id()) as package:
        result = package.finish()
    assert zipfile.ZipFile(io.BytesIO(s3.get_object(Bucket=bucket, Key=result.key)["Body"].read())).namelist() == [
        "manifest.json"
    ]


def test_bad_input_is_refused_without_values_in_the_message(s3: Any) -> None:
    bucket = _bucket(s3)
    with pytest.raises(ValueError):
        PackageWriter(s3, bucket, "../etc")
    with PackageWriter(s3, bucket, _request_id()) as package:
        with pytest.raises(ValueError):
            package.add_json("../outside.json", {})
        with pytest.raises(ValueError) as raised:
            package.add_table("account", "accounts", ["id", "email"], [(1, "ann@example.com", "extra")])
        assert "ann@example.com" not in str(raised.value)
    with PackageWriter(s3, bucket, _request_id()) as package, pytest.raises(TypeError) as type_error:
        package.add_table("account", "accounts", ["id", "blob"], [(1, object())])
    assert "object" in str(type_error.value)


def test_missing_s3_object_raises_export_error_naming_no_file(s3: Any) -> None:
    bucket = _bucket(s3)
    with PackageWriter(s3, bucket, "req_missing") as package:
        with pytest.raises(ExportError) as raised:
            package.add_s3_object("content/files/x.pdf", s3, bucket, "accounts/1/assets/9/Ann Lee CV.pdf")
        # The writer is still usable: nothing was written for the missing file.
        package.add_json("account/profile.json", {})
        package.finish()
    assert "CV" not in str(raised.value) and "accounts/1/assets/9/…" in str(raised.value)
    assert "404" in str(raised.value)

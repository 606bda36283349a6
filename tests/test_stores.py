"""Integration tests of privacy_ops.stores.s3 and .stripe_store against the stack's real moto and localstripe.

Fixtures (`stack`, `settings`, `s3`, `stripe_client`, `reset_services`) come from tests/conftest.py; every test
here starts from an empty S3 and Stripe. The session's stack is started once (by the `stack` fixture).
"""

from __future__ import annotations

import datetime as dt
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import botocore.session
import pytest
import stripe
from botocore.stub import Stubber

from privacy_ops.settings import Settings
from privacy_ops.stores import s3 as s3_store
from privacy_ops.stores import stripe_store
from privacy_ops.stores.errors import StoreError

if TYPE_CHECKING:
    from stripe._base_address import BaseAddresses

pytestmark = pytest.mark.usefixtures("reset_services")

FULL_CARD = "4242424242424242"
SECOND_CARD = "5555555555554444"


# ------------------------------------------------------------------------------------------------ S3 helpers


def _not_chained(error: BaseException) -> bool:
    """The original library error (whose message may hold values) is not printed with the traceback."""
    return error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)


def _bucket(s3: Any, *, versioned: bool = True, object_lock: bool = False) -> str:
    name = f"test-{uuid.uuid4().hex[:12]}"
    region = s3.meta.region_name
    kwargs: dict[str, Any] = {"Bucket": name}
    if region != "us-east-1":
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
    if object_lock:
        kwargs["ObjectLockEnabledForBucket"] = True  # also turns versioning on
    s3.create_bucket(**kwargs)
    if versioned and not object_lock:
        s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    return name


def _write_history(s3: Any, bucket: str, prefix: str, keys: int) -> None:
    """Per key: two versions, then a delete marker (3 entries per key)."""
    names = [f"{prefix}assets/{index}/file-{index}.txt" for index in range(keys)]

    def two_versions(key: str) -> None:
        s3.put_object(Bucket=bucket, Key=key, Body=b"first")
        s3.put_object(Bucket=bucket, Key=key, Body=b"second version")

    with ThreadPoolExecutor(max_workers=8) as pool:  # moto answers ~10-20 ms a call; in parallel ~3x faster
        list(pool.map(two_versions, names))
    for start in range(0, keys, 1000):  # a delete without VersionId only adds a delete marker
        batch = names[start : start + 1000]
        s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": key} for key in batch], "Quiet": True})


# ------------------------------------------------------------------------------------------------ S3


def test_list_versions_returns_versions_and_delete_markers(s3: Any) -> None:
    bucket = _bucket(s3)
    s3.put_object(Bucket=bucket, Key="accounts/1/a.txt", Body=b"12345")
    s3.put_object(Bucket=bucket, Key="accounts/1/a.txt", Body=b"123")
    s3.delete_object(Bucket=bucket, Key="accounts/1/a.txt")

    versions = s3_store.list_versions(s3, bucket, "accounts/1/")

    assert sorted((v.is_delete_marker, v.size, v.is_latest) for v in versions) == [
        (False, 3, False),
        (False, 5, False),
        (True, 0, True),
    ]
    assert all(v.key == "accounts/1/a.txt" and v.version_id for v in versions)
    assert all(isinstance(v.last_modified, dt.datetime) for v in versions)


def test_purge_prefix_removes_every_version_and_marker_and_is_idempotent(s3: Any) -> None:
    bucket = _bucket(s3)
    _write_history(s3, bucket, "accounts/1/", keys=400)  # 800 versions + 400 delete markers
    _write_history(s3, bucket, "accounts/12/", keys=5)  # shares the string prefix "accounts/1": must survive
    assert len(s3_store.list_versions(s3, bucket, "accounts/1/")) == 1200

    result = s3_store.purge_prefix(s3, bucket, "accounts/1/")

    assert (result.versions_deleted, result.delete_markers_deleted, result.retained) == (800, 400, 0)
    assert s3_store.list_versions(s3, bucket, "accounts/1/") == []
    assert len(s3_store.list_versions(s3, bucket, "accounts/12/")) == 15

    again = s3_store.purge_prefix(s3, bucket, "accounts/1/")
    assert (again.versions_deleted, again.delete_markers_deleted, again.retained) == (0, 0, 0)
    assert again.attempts == 1


def test_purge_reports_locked_versions_as_retained(s3: Any) -> None:
    bucket = _bucket(s3, object_lock=True)
    held, governed, free = "accounts/3/held.pdf", "accounts/3/governed.pdf", "accounts/3/free.pdf"
    s3.put_object(Bucket=bucket, Key=held, Body=b"h")
    s3.put_object_legal_hold(Bucket=bucket, Key=held, LegalHold={"Status": "ON"})
    until = dt.datetime.now(dt.UTC) + dt.timedelta(days=30)
    s3.put_object(
        Bucket=bucket, Key=governed, Body=b"g", ObjectLockMode="GOVERNANCE", ObjectLockRetainUntilDate=until
    )
    s3.put_object(Bucket=bucket, Key=free, Body=b"f1")
    s3.put_object(Bucket=bucket, Key=free, Body=b"f2")

    result = s3_store.purge_prefix(s3, bucket, "accounts/3/")

    assert (result.versions_deleted, result.retained, result.retained_keys) == (2, 2, 2)
    remaining = {v.key for v in s3_store.list_versions(s3, bucket, "accounts/3/")}
    assert remaining == {held, governed}
    # A rerun deletes nothing more and reports the same retention, without failing.
    again = s3_store.purge_prefix(s3, bucket, "accounts/3/")
    assert (again.versions_deleted, again.delete_markers_deleted, again.retained) == (0, 0, 2)


def test_purge_refuses_a_prefix_that_is_not_a_folder(s3: Any) -> None:
    for prefix in ("", "/", "accounts/1"):
        with pytest.raises(ValueError):
            s3_store.purge_prefix(s3, "any-bucket", prefix)


def test_access_denied_without_lock_fails_and_hides_the_file_name() -> None:
    """A refusal that is not a lock (missing permission) must fail the erasure, naming no file."""
    client = botocore.session.get_session().create_client(
        "s3", region_name="eu-central-1", aws_access_key_id="x", aws_secret_access_key="y"
    )
    key = "accounts/9/assets/4/Ann Lee passport.pdf"
    when = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    listing = {
        "Versions": [{"Key": key, "VersionId": "v1", "Size": 1, "LastModified": when, "IsLatest": True}],
        "IsTruncated": False,
    }
    with Stubber(client) as stub:
        stub.add_response("list_object_versions", listing)
        stub.add_response("delete_objects", {"Errors": [{"Key": key, "Code": "AccessDenied", "Message": key}]})
        stub.add_response("list_object_versions", listing)
        stub.add_response("head_object", {"ContentLength": 1})  # no lock, no legal hold
        with pytest.raises(StoreError) as raised:
            s3_store.purge_prefix(client, "bucket", "accounts/9/")
    assert "denied without object lock" in str(raised.value)
    assert "passport" not in str(raised.value) and "Ann" not in str(raised.value)
    assert _not_chained(raised.value)


def test_s3_errors_become_store_errors(s3: Any) -> None:
    with pytest.raises(StoreError) as raised:
        s3_store.list_versions(s3, "no-such-bucket-here", "accounts/1/")
    assert str(raised.value) == "s3: list versions no-such-bucket-here/accounts/1/ failed: 404 NoSuchBucket"
    assert raised.value.status == 404


def test_clients_from_settings(settings: Settings) -> None:
    assert "Buckets" in s3_store.client(settings).list_buckets()
    client = stripe_store.client(settings)
    assert stripe_store.customers_frame(client, customer_ids=["cus_unknown"], emails=["nobody@example.org"]).empty


# ------------------------------------------------------------------------------------------------ Stripe helpers


class _RecordingHTTPClient(stripe.RequestsClient):
    """Records (method, path, Idempotency-Key) of every request the SDK sends."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str, str | None]] = []

    def request(self, method: str, url: str, headers: Any, post_data: Any = None, **kwargs: Any) -> Any:
        path = url.split("//", 1)[-1].split("/", 1)[-1].split("?", 1)[0]
        self.calls.append((method.upper(), "/" + path, (headers or {}).get("Idempotency-Key")))
        return super().request(method, url, headers, post_data, **kwargs)


def _customer_with_cards(client: stripe.StripeClient) -> str:
    customer = client.v1.customers.create(
        {
            "email": "ann.lee@example.com",
            "name": "Ann Lee",
            "phone": "+49 30 1234567",
            "description": "Ann's agency",
            "address": {"line1": "Hauptstr. 1", "city": "Berlin", "postal_code": "10115", "country": "DE"},
            "metadata": {"account_id": "42"},
        }
    )
    for number in (FULL_CARD, SECOND_CARD):
        method = client.v1.payment_methods.create(
            {"type": "card", "card": {"number": number, "exp_month": 8, "exp_year": 2031, "cvc": "123"}}
        )
        client.v1.payment_methods.attach(method.id, {"customer": customer.id})
    # A paid subscription gives the customer an invoice (localstripe has no standalone Invoice.create).
    product = client.v1.products.create({"name": "CellCMS Pro"})
    plan = client.v1.plans.create({"product": product.id, "amount": 2900, "currency": "eur", "interval": "month"})
    client.v1.customers.update(customer.id, {"invoice_settings": {"default_payment_method": method.id}})
    client.v1.subscriptions.create({"customer": customer.id, "items": [{"plan": plan.id}]})
    return customer.id


@pytest.fixture
def recording_client(settings: Settings) -> tuple[stripe.StripeClient, _RecordingHTTPClient]:
    """A StripeClient on the stack's Stripe (built like stripe_store.client) whose requests are recorded."""
    http = _RecordingHTTPClient()
    base: BaseAddresses = {"api": settings.stripe_api_base} if settings.stripe_api_base else {}
    key = settings.stripe_api_key.get_secret_value()
    return stripe.StripeClient(key, base_addresses=base, http_client=http), http


# ------------------------------------------------------------------------------------------------ Stripe


def test_customer_summary_shows_cards_as_brand_last4_expiry_only(stripe_client: stripe.StripeClient) -> None:
    customer_id = _customer_with_cards(stripe_client)

    summary = stripe_store.customer_summary(stripe_client, customer_id)

    assert summary is not None
    assert summary["customer"]["email"] == "ann.lee@example.com"
    assert summary["customer"]["address"]["city"] == "Berlin"
    assert summary["customer"]["created"].endswith("+00:00")
    assert sorted(pm["last4"] for pm in summary["payment_methods"]) == ["4242", "4444"]
    assert all(set(pm) == {"brand", "last4", "exp_month", "exp_year"} for pm in summary["payment_methods"])
    assert FULL_CARD not in repr(summary) and SECOND_CARD not in repr(summary)
    [invoice] = summary["invoices"]
    assert (invoice["amount_paid"], invoice["currency"], invoice["status"]) == (2900, "eur", "paid")
    assert set(invoice) == {"id", "number", "created", "amount_due", "amount_paid", "currency", "status"}


def test_erase_customer_detaches_redacts_deletes_and_is_idempotent(
    stripe_client: stripe.StripeClient, recording_client: tuple[stripe.StripeClient, _RecordingHTTPClient]
) -> None:
    customer_id = _customer_with_cards(stripe_client)
    bystander = stripe_client.v1.customers.create({"email": "bob@example.com", "name": "Bob"}).id
    client, http = recording_client

    first = stripe_store.erase_customer(client, customer_id, "req_erase1")

    assert first == stripe_store.StripeErasure(
        payment_methods_detached=2, customer_redacted=True, customer_deleted=True, already_gone=False
    )
    mutations = [(method, path, key) for method, path, key in http.calls if method in ("POST", "DELETE")]
    assert len(mutations) == 4  # 2 detaches, 1 redaction, 1 delete
    assert all(key and key.startswith("privacy-ops:req_erase1:") for _, _, key in mutations)
    assert len({key for _, _, key in mutations}) == 4
    assert ("DELETE", f"/v1/customers/{customer_id}", f"privacy-ops:req_erase1:delete:{customer_id}") in mutations

    second = stripe_store.erase_customer(client, customer_id, "req_erase1")
    assert second == stripe_store.StripeErasure(
        0, customer_redacted=False, customer_deleted=False, already_gone=True
    )
    assert stripe_store.customer_summary(client, customer_id) is None

    remaining = stripe_store.customers_frame(
        stripe_client, customer_ids=[customer_id, bystander], emails=["ann.lee@example.com"]
    )
    assert list(remaining.columns) == ["id", "email", "name", "phone"]
    assert remaining["id"].tolist() == [bystander]
    assert "ann.lee@example.com" not in remaining["email"].tolist()


def test_erase_of_an_unknown_customer_is_already_gone(stripe_client: stripe.StripeClient) -> None:
    result = stripe_store.erase_customer(stripe_client, "cus_doesnotexist", "req_x")
    assert result.already_gone and not result.customer_deleted


def test_idempotency_keys_are_stable_and_bounded() -> None:
    key = stripe_store.idempotency_key("req_1", "cus_1", "delete")
    assert key == stripe_store.idempotency_key("req_1", "cus_1", "delete") == "privacy-ops:req_1:delete:cus_1"
    assert len(stripe_store.idempotency_key("req_1", "x" * 400, "delete")) <= 255
    with pytest.raises(ValueError):
        stripe_store.idempotency_key("", "cus_1", "delete")


def test_stripe_errors_name_operation_and_id_only() -> None:
    unreachable = stripe.StripeClient(
        "sk_test_x", base_addresses={"api": "http://127.0.0.1:9"}, max_network_retries=0
    )
    with pytest.raises(StoreError) as raised:
        stripe_store.erase_customer(unreachable, "cus_123", "req_1")
    assert str(raised.value) == "stripe: retrieve customer cus_123 failed: None APIConnectionError"
    assert _not_chained(raised.value)

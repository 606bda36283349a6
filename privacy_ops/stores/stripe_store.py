"""Stripe operations of the privacy flows: what Stripe holds about a customer, and erasing it.

Only calls that both real Stripe and localstripe (the local stand-in) support are used: customers
retrieve/list/modify/delete, payment methods list(customer=, type="card")/detach/retrieve, invoices
list(customer=).
Differences handled here:
- a deleted customer is a 404 in localstripe and a `{"deleted": true}` object in Stripe: both mean "gone";
- localstripe answers `''` where Stripe answers null: empty strings are normalised to None;
- stripe 16's StripeObject is not a dict: values are read through `.to_dict()`.

Every mutating call carries an idempotency key derived from the privacy request id, the object id and the
operation, so that a rerun of the same request (a Prefect retry) cannot do anything different from the first run.
Errors surface as `StoreError` naming the operation and the Stripe id, never the customer's values.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import pandas as pd
import stripe

from privacy_ops.pii import Pii
from privacy_ops.stores.errors import StoreError

if TYPE_CHECKING:
    from stripe._base_address import BaseAddresses

    from privacy_ops.settings import Settings

T = TypeVar("T")

# Personal fields of a customer that erasure blanks before deleting it. In the Stripe API an empty string unsets a
# field (address and shipping included); metadata is blanked key by key, because localstripe ignores `metadata=""`.
_PERSONAL_FIELDS = ("name", "email", "phone", "address", "description", "shipping")
_IDEMPOTENCY_KEY_MAX = 255  # Stripe's limit


@dataclass(frozen=True, slots=True)
class StripeErasure:
    """What erasing one customer did; a rerun after success reports only already_gone."""

    payment_methods_detached: int
    customer_redacted: bool  # personal fields blanked by this call
    customer_deleted: bool  # deleted by this call
    already_gone: bool  # the customer did not exist (any more) when this call reached it


def client(settings: Settings) -> stripe.StripeClient:
    """The Stripe client from Settings; `stripe_api_base` points it at localstripe or a proxy."""
    base: BaseAddresses = {"api": settings.stripe_api_base} if settings.stripe_api_base else {}
    # Network retries are safe: every mutating call below carries an idempotency key.
    return stripe.StripeClient(
        settings.stripe_api_key.get_secret_value(), base_addresses=base, max_network_retries=2
    )


def idempotency_key(request_id: str, object_id: str, operation: str) -> str:
    """The key of one mutation of one object for one privacy request: identical across reruns of the request."""
    if not request_id:
        raise ValueError("request_id is required for idempotent Stripe calls")
    key = f"privacy-ops:{request_id}:{operation}:{object_id}"
    if len(key) > _IDEMPOTENCY_KEY_MAX:
        key = "privacy-ops:" + hashlib.sha256(key.encode()).hexdigest()
    return key


def subscription_prices(client: stripe.StripeClient, customer_id: str) -> list[str]:
    """What a customer pays, e.g. ["1900 eur/month"], one entry per item of each active subscription (for the
    non-discrimination check: a request must not change it). A deleted or unknown customer pays nothing."""

    def fetch() -> list[dict[str, Any]]:
        pages = client.v1.subscriptions.list({"customer": customer_id, "limit": 100})
        return [subscription.to_dict() for subscription in pages.auto_paging_iter()]

    try:
        subscriptions = fetch()
    except stripe.StripeError as error:
        if _is_missing(error):
            return []
        _raise("list subscriptions of", customer_id, error)
    return sorted(
        f"{item['plan']['amount']} {item['plan']['currency']}/{item['plan']['interval']}"
        for subscription in subscriptions
        if subscription.get("status") in ("active", "trialing", "past_due")
        for item in subscription["items"]["data"]
    )


def customer_summary(client: stripe.StripeClient, customer_id: str) -> dict[str, Any] | None:
    """What Stripe holds about a customer, for the access package; None if the customer does not exist.

    Cards are shown as brand, last 4 digits and expiry only (Stripe never returns more, and nothing else from the
    payment method, e.g. its fingerprint, goes into the package). `created` is ISO-8601 UTC.
    """
    customer = _retrieve_customer(client, customer_id)
    if customer is None:
        return None
    cards = [
        {
            "brand": _blank_to_none(card.get("brand")),
            "last4": _blank_to_none(card.get("last4")),
            "exp_month": card.get("exp_month"),
            "exp_year": card.get("exp_year"),
        }
        for card in (pm.get("card") or {} for pm in _list_cards(client, customer_id))
    ]
    invoices = [
        {
            "id": invoice.get("id"),
            "number": _blank_to_none(invoice.get("number")),
            "created": _iso(invoice.get("created")),
            "amount_due": invoice.get("amount_due"),
            "amount_paid": invoice.get("amount_paid"),
            "currency": _blank_to_none(invoice.get("currency")),
            "status": _blank_to_none(invoice.get("status")),
        }
        for invoice in _call(
            "list invoices",
            customer_id,
            lambda: [i.to_dict() for i in client.v1.invoices.list({"customer": customer_id}).auto_paging_iter()],
        )
    ]
    address = customer.get("address")
    return {
        "customer": {
            "id": customer["id"],
            "email": _blank_to_none(customer.get("email")),
            "name": _blank_to_none(customer.get("name")),
            "phone": _blank_to_none(customer.get("phone")),
            "address": _compact(address),
            "created": _iso(customer.get("created")),
        },
        "payment_methods": cards,
        "invoices": invoices,
    }


def erase_customer(client: stripe.StripeClient, customer_id: str, request_id: str) -> StripeErasure:
    """Detach every card, blank the customer's personal fields, delete the customer; idempotent.

    Invoices stay in Stripe (tax law) and keep Stripe's own copy of the billing details. A customer that is
    already deleted or unknown counts as done (`already_gone`).
    """
    customer = _retrieve_customer(client, customer_id)
    if customer is None:
        return StripeErasure(0, customer_redacted=False, customer_deleted=False, already_gone=True)

    detached = 0
    # Collect all pages before detaching: detaching while paginating shifts the pages.
    for pm in _list_cards(client, customer_id):
        if _detach(client, pm["id"], request_id):
            detached += 1

    redacted = False
    blank = _blanking_params(customer)
    if blank:
        # A rerun finds the fields already blank and skips the call: resending the same key with different
        # parameters (fewer metadata keys) would be an IdempotencyError at Stripe.
        try:
            client.v1.customers.update(
                customer_id,
                blank,  # type: ignore[arg-type]  # built dynamically; keys are CustomerUpdateParams fields
                {"idempotency_key": idempotency_key(request_id, customer_id, "redact")},
            )
            redacted = True
        except stripe.StripeError as error:
            if _is_missing(error):
                return StripeErasure(detached, customer_redacted=False, customer_deleted=False, already_gone=True)
            _raise("redact customer", customer_id, error)

    try:
        client.v1.customers.delete(
            customer_id, options={"idempotency_key": idempotency_key(request_id, customer_id, "delete")}
        )
    except stripe.StripeError as error:
        if _is_missing(error):
            return StripeErasure(detached, customer_redacted=redacted, customer_deleted=False, already_gone=True)
        _raise("delete customer", customer_id, error)
    return StripeErasure(detached, customer_redacted=redacted, customer_deleted=True, already_gone=False)


def customers_frame(client: stripe.StripeClient, *, customer_ids: list[str], emails: list[str]) -> pd.DataFrame:
    """The customers still holding the subject (id, email, name, phone): each known id retrieved, and any customer
    listed under one of their emails. Checked by Great Expectations after erasure; scales with the subject, not
    with the account (a real Stripe account has millions of customers)."""
    columns = ["id", "email", "name", "phone"]
    found: dict[str, dict[str, Any]] = {}
    for customer_id in customer_ids:
        customer = _retrieve_customer(client, customer_id)
        if customer is not None:
            found[customer["id"]] = customer
    for email in emails:

        def list_by_email(email: str = email) -> list[dict[str, Any]]:
            return [
                c.to_dict() for c in client.v1.customers.list({"email": email, "limit": 100}).auto_paging_iter()
            ]

        listed = _call("list customers", "by email", list_by_email)
        found.update((c["id"], c) for c in listed)
    rows = [[_blank_to_none(c.get(col)) for col in columns] for c in found.values()]
    return pd.DataFrame(rows, columns=columns, dtype=object)


# ------------------------------------------------------------------------------------------------ helpers


def _retrieve_customer(client: stripe.StripeClient, customer_id: str) -> dict[str, Any] | None:
    """The customer as a dict, or None when it is deleted (Stripe) or unknown (404, localstripe)."""
    try:
        customer = client.v1.customers.retrieve(customer_id).to_dict()
    except stripe.StripeError as error:
        if _is_missing(error):
            return None
        _raise("retrieve customer", customer_id, error)
    return None if customer.get("deleted") else customer


def _list_cards(client: stripe.StripeClient, customer_id: str) -> list[dict[str, Any]]:
    def fetch() -> list[dict[str, Any]]:
        pages = client.v1.payment_methods.list({"customer": customer_id, "type": "card", "limit": 100})
        return [pm.to_dict() for pm in pages.auto_paging_iter()]

    try:
        return fetch()
    except stripe.StripeError as error:
        if _is_missing(error):  # the customer went away meanwhile: it has no cards any more
            return []
        _raise("list payment methods of", customer_id, error)


def _detach(client: stripe.StripeClient, payment_method_id: str, request_id: str) -> bool:
    """Detach one payment method; False if it was already detached (a rerun after the idempotency key expired)."""
    try:
        client.v1.payment_methods.detach(
            payment_method_id,
            options={"idempotency_key": idempotency_key(request_id, payment_method_id, "detach")},
        )
        return True
    except stripe.StripeError as error:
        if _is_missing(error):
            return False
        if error.http_status == 400:
            # Stripe refuses to detach a payment method that is not attached: check that this is the reason.
            current = _call(
                "retrieve payment method",
                payment_method_id,
                lambda: client.v1.payment_methods.retrieve(payment_method_id).to_dict(),
            )
            if not current.get("customer"):
                return False
        _raise("detach payment method", payment_method_id, error)


def _blanking_params(customer: dict[str, Any]) -> dict[str, Any]:
    """The modify parameters that blank whatever personal field still holds a value; {} if nothing does."""
    params: dict[str, Any] = {field: "" for field in _PERSONAL_FIELDS if customer.get(field) not in (None, "", {})}
    metadata = customer.get("metadata") or {}
    filled = sorted(key for key, value in metadata.items() if value not in (None, ""))
    if filled:
        params["metadata"] = dict.fromkeys(filled, "")
    return params


def _is_missing(error: stripe.StripeError) -> bool:
    return error.http_status == 404 or error.code == "resource_missing"


def _call(operation: str, object_id: str, fn: Callable[[], T]) -> T:
    try:
        return fn()
    except stripe.StripeError as error:
        _raise(operation, object_id, error)


def _raise(operation: str, object_id: str, error: stripe.StripeError) -> NoReturn:
    # Stripe's messages may quote parameters (an invalid email, say): keep only status and code.
    status = error.http_status
    code = error.code or type(error).__name__
    message = f"stripe: {operation} {object_id} failed: {status} {code}"
    raise StoreError(message, status=status, code=code) from None


def _compact(address: Any) -> dict[str, Any] | None:
    """An address without its empty lines; None when there is none ('' in localstripe, null in Stripe)."""
    if not isinstance(address, dict):
        return None
    return {key: value for key, value in address.items() if value not in (None, "")} or None


def _blank_to_none(value: Any) -> Any:
    return None if value == "" else value


def _iso(epoch: Any) -> str | None:
    if epoch in (None, ""):
        return None
    return datetime.fromtimestamp(int(epoch), UTC).isoformat()


# ------------------------------------------------------------------------------------------------ rectification

_ADDRESS_PARTS = ("line1", "line2", "city", "postal_code", "state", "country")
# The customer fields a correction may reach (dotted for the address): Stripe and localstripe both accept them.
CUSTOMER_FIELDS = frozenset({"name", "email", "phone", *(f"address.{part}" for part in _ADDRESS_PARTS)})


@dataclass(frozen=True, slots=True)
class CopyCorrection:
    """One customer field to correct where it is a copy of the corrected value (values are Pii: masked)."""

    field: str  # one of CUSTOMER_FIELDS
    new: Pii
    old: tuple[Pii, ...]  # the values it replaces; a field holding anything else is a different value and stays
    caseless: bool = False  # emails compare case-insensitively


@dataclass(frozen=True, slots=True)
class CustomerCorrection:
    """What correcting one customer did, by field name; a rerun after success reports only `already`."""

    corrected: tuple[str, ...]  # set to the new value by this call
    already: tuple[str, ...]  # held the new value already
    left: tuple[str, ...]  # held a different value: not a copy of the corrected one, left alone
    missing: bool  # the customer does not exist (any more)


def correct_customer(
    client: stripe.StripeClient, customer_id: str, corrections: Sequence[CopyCorrection], request_id: str
) -> CustomerCorrection:
    """Set each field that holds one of its old values to its new value, in one modify call with an idempotency
    key; a rerun finds the fields set and calls nothing (resending the key with other parameters would be an
    IdempotencyError at Stripe). The address is sent whole: localstripe replaces it, Stripe merges it."""
    for correction in corrections:
        if correction.field not in CUSTOMER_FIELDS:
            raise ValueError(f"stripe: customers have no field {correction.field}")
    customer = _retrieve_customer(client, customer_id)
    if customer is None:
        return CustomerCorrection((), (), (), missing=True)
    address: dict[str, Any] = _compact(customer.get("address")) or {}
    params: dict[str, Any] = {}
    corrected: list[str] = []
    already: list[str] = []
    left: list[str] = []
    for correction in corrections:
        top, _, part = correction.field.partition(".")
        current = address.get(part) if part else _blank_to_none(customer.get(top))
        new = correction.new.reveal()
        if current == new:
            already.append(correction.field)
        elif current is None:
            continue  # nothing there: not a copy
        elif any(_same_value(current, old.reveal(), correction.caseless) for old in correction.old):
            if part:
                address[part] = new
                params["address"] = address
            else:
                params[top] = new
            corrected.append(correction.field)
        else:
            left.append(correction.field)
    if params:
        try:
            client.v1.customers.update(
                customer_id,
                params,  # type: ignore[arg-type]  # built dynamically; keys are CustomerUpdateParams fields
                {"idempotency_key": idempotency_key(request_id, customer_id, "rectify")},
            )
        except stripe.StripeError as error:
            if _is_missing(error):
                return CustomerCorrection((), tuple(already), tuple(left), missing=True)
            _raise("correct customer", customer_id, error)
    return CustomerCorrection(tuple(corrected), tuple(already), tuple(left), missing=False)


def _same_value(current: Any, old: str, caseless: bool) -> bool:
    if not isinstance(current, str):
        return False
    return current.strip().lower() == old.strip().lower() if caseless else current == old

"""The sandbox's Stripe side: a customer with a card and a subscription for every paying account.

Uses only calls that both real Stripe (test mode) and localstripe support: payment_methods.create (raw test card
number; real Stripe needs "raw card data" enabled on the test account for that), customers.create/delete,
products.create, plans.create, subscriptions.create. A subscription makes Stripe issue and pay the first invoice;
its id becomes the stripe_invoice_id of the account's newest invoice row.

Each create carries an idempotency key unique to this seeding run, so a retried request never makes a duplicate
customer, while the next run (after a reset) creates fresh ones.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import stripe

from cellcms_sandbox.synthetic import PLAN_PRICES, StripeCustomer

if TYPE_CHECKING:
    from stripe._request_options import RequestOptions


class StripeSeeder:
    """Creates products, plans and customers for one seeding run."""

    def __init__(self, client: stripe.StripeClient) -> None:
        self.client = client
        self._run = uuid.uuid4().hex[:16]
        self._plans: dict[tuple[str, str], str] = {}
        self._products: dict[str, str] = {}

    def _options(self, *parts: object) -> RequestOptions:
        return {"idempotency_key": "cellcms-seed-" + "-".join([self._run, *map(str, parts)])}

    def _plan_id(self, plan: str, currency: str) -> str:
        """The monthly plan for (plan, currency), created on first use."""
        key = (plan, currency)
        if key not in self._plans:
            if plan not in self._products:
                product = self.client.v1.products.create(
                    params={"name": f"CellCMS {plan.title()}", "metadata": {"cellcms_plan": plan}},
                    options=self._options("product", plan),
                )
                self._products[plan] = product.id
            created = self.client.v1.plans.create(
                params={
                    "product": self._products[plan],
                    "amount": PLAN_PRICES[key],
                    "currency": currency.lower(),
                    "interval": "month",
                    "nickname": f"{plan} monthly {currency}",
                },
                options=self._options("plan", plan, currency),
            )
            self._plans[key] = created.id
        return self._plans[key]

    def create_customer(self, customer: StripeCustomer) -> tuple[str, str | None]:
        """Customer + card + subscription; returns (customer id, id of the invoice the subscription issued)."""
        account = customer.account_id
        payment_method = self.client.v1.payment_methods.create(
            params={
                "type": "card",
                "card": {"number": "4242424242424242", "exp_month": 12, "exp_year": 2034, "cvc": "123"},
            },
            options=self._options("pm", account),
        )
        created = self.client.v1.customers.create(
            params={
                "name": customer.name,
                "email": customer.email,
                "address": {
                    "line1": customer.line1,
                    "city": customer.city,
                    "postal_code": customer.postal_code,
                    "country": customer.country,
                },
                "payment_method": payment_method.id,
                "invoice_settings": {"default_payment_method": payment_method.id},
                "metadata": {"cellcms_account_id": str(account)},
            },
            options=self._options("customer", account),
        )
        subscription = self.client.v1.subscriptions.create(
            params={"customer": created.id, "items": [{"plan": self._plan_id(customer.plan, customer.currency)}]},
            options=self._options("subscription", account),
        )
        return created.id, _object_id(subscription.latest_invoice)


def _object_id(value: Any) -> str | None:
    """An expandable field: an id string, an object with .id, or empty (localstripe says '' for null)."""
    if not value:
        return None
    return value if isinstance(value, str) else str(value.id)


def delete_customers(client: stripe.StripeClient, customer_ids: Iterable[str]) -> int:
    """Delete customers (their subscriptions end with them); an already deleted one counts as done."""
    deleted = 0
    for customer_id in customer_ids:
        try:
            client.v1.customers.delete(customer_id)
            deleted += 1
        except stripe.InvalidRequestError as error:
            # localstripe answers 404 for a deleted customer; real Stripe returns a `deleted` object instead.
            if error.http_status != 404:
                raise
    return deleted

"""How every step of a privacy flow is declared: persisted (encrypted) so a retried flow run skips finished steps.

The cache policy is Prefect's default (task source + inputs + flow run id) minus the `services` argument, which
holds live clients: a retry of the SAME flow run reuses finished results, a new request never reuses another's.
Steps that read state that changes while a run waits (verification status) use `live_step` and are never cached.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from prefect import task
from prefect.cache_policies import DEFAULT, NO_CACHE

from privacy_ops.results import EncryptedPickleSerializer

F = TypeVar("F", bound=Callable[..., Any])

STEP_CACHE = DEFAULT - "services"


def step(*, retries: int = 2, retry_delay_seconds: float = 5) -> Callable[[F], F]:
    """A persisted, retried, run-scoped step."""

    def decorate(fn: F) -> F:
        # Prefect's `task` overloads omit `task(fn, **options)`, which its implementation accepts.
        return task(  # type: ignore[call-overload]
            fn,
            persist_result=True,
            result_serializer=EncryptedPickleSerializer(),
            cache_policy=STEP_CACHE,
            retries=retries,
            retry_delay_seconds=retry_delay_seconds,
        )

    return decorate


def live_step(fn: F) -> F:
    """A step that must run every time (it reads state that changes between attempts)."""
    # Prefect's `task` overloads omit `task(fn, **options)`, which its implementation accepts.
    return task(fn, cache_policy=NO_CACHE, persist_result=False)  # type: ignore[call-overload]

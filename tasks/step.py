"""How every step of a privacy flow is declared: persisted (encrypted) so a retried flow run skips finished steps.

The cache policy is Prefect's default (task source + inputs + flow run id) minus the `services` argument, which
holds live clients: a retry of the SAME flow run reuses finished results, a new request never reuses another's.
Steps that read state that changes while a run waits (verification status) use `live_step` and are never cached.

The inputs are hashed in a form that does not depend on the process. Prefect's own INPUTS policy hashes
cloudpickle bytes, and a set of strings pickles in an order that changes with each process's string-hash seed: a
retry from the UI (a new flow-run process) computed another key for every step taking the subject snapshot
(whose identifiers are frozensets) and ran erase_postgres & co. again. `StableInputs` sorts sets, unfolds
dataclasses, pydantic models and enums, and replaces a `Pii` value by a keyed hash before hashing.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from prefect import task
from prefect.cache_policies import NO_CACHE, RUN_ID, TASK_SOURCE, CachePolicy
from prefect.context import TaskRunContext
from prefect.utilities.hashing import hash_objects
from pydantic import BaseModel

from privacy_ops.pii import Pii, keyed_hash
from privacy_ops.results import EncryptedPickleSerializer

F = TypeVar("F", bound=Callable[..., Any])


def stable(value: Any) -> Any:
    """`value` rebuilt from dicts with string keys, lists and scalars, in an order that is the same in every
    process (sets sorted, dict items sorted); values of other types are kept as they are."""
    if isinstance(value, Pii):
        from privacy_ops.services import current_settings

        return {"pii": keyed_hash(current_settings().secret_key.get_secret_value(), value.reveal(), "cache-key")}
    if isinstance(value, enum.Enum):
        return {"enum": f"{type(value).__module__}.{type(value).__qualname__}", "value": stable(value.value)}
    if isinstance(value, BaseModel):
        return {"model": f"{type(value).__module__}.{type(value).__qualname__}", "fields": stable(dict(value))}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        unfolded = {f.name: stable(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {"dataclass": f"{type(value).__module__}.{type(value).__qualname__}", "fields": unfolded}
    if isinstance(value, set | frozenset):
        return {"set": sorted((stable(item) for item in value), key=_order)}
    if isinstance(value, dict):
        items = sorted(([stable(k), stable(v)] for k, v in value.items()), key=lambda item: _order(item[0]))
        return {"dict": items}
    if isinstance(value, list | tuple):
        return [stable(item) for item in value]
    return value


def _order(value: Any) -> str:
    return f"{type(value).__name__}:{json.dumps(value, sort_keys=True, default=repr)}"


@dataclass
class StableInputs(CachePolicy):
    """Prefect's INPUTS policy (same `exclude`, same `- "name"`), hashing `stable(inputs)`. Not a subclass of
    `Inputs`: Prefect's compound policy would replace it by a plain `Inputs`."""

    exclude: list[str] = field(default_factory=list)

    def compute_key(
        self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str | None:
        kept = {name: value for name, value in (inputs or {}).items() if name not in self.exclude}
        if not kept:
            return None
        return hash_objects(stable(kept), raise_on_failure=True)

    def __sub__(self, other: str) -> CachePolicy:
        return replace(self, exclude=[*self.exclude, other])


STEP_CACHE: CachePolicy = (StableInputs() - "services") + TASK_SOURCE + RUN_ID


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

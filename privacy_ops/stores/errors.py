"""The one error the store modules raise: it names the operation and the object, never a personal value.

botocore and stripe errors can carry request parameters or response bodies (an email in an "invalid email" message,
a file name in an S3 key). Prefect stores exception messages and tracebacks in its database, so the stores catch
those errors and re-raise a `StoreError` whose message is built only from the operation, an id we chose to show,
and the HTTP status / error code. The original is not chained (`from None`): a chained traceback would print it.
"""

from __future__ import annotations


class StoreError(Exception):
    """An external store (S3, Stripe) failed; `str()` names operation, object id and status only."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status  # HTTP status when the store answered, else None (network error)
        self.code = code  # the store's machine-readable error code (e.g. "AccessDenied", "resource_missing")

"""Encrypted persisted task results: what lets a retried flow run skip finished steps without storing data in
clear.

Prefect persists task results (cloudpickle) to result storage so that a retry of the same flow run skips the steps
that finished. Those results may carry identifiers, so they are pickled, then encrypted with a Fernet key derived
from PRIVACY_OPS_SECRET_KEY. The key is read when a result is written or read, not at import.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any, Literal

import cloudpickle
from cryptography.fernet import Fernet
from prefect.serializers import Serializer


def fernet() -> Fernet:
    """The project's symmetric cipher for personal data at rest (task results, subject snapshots)."""
    from privacy_ops.services import current_settings

    secret = current_settings().secret_key.get_secret_value()
    key = hashlib.sha256(f"privacy-ops-results|{secret}".encode()).digest()
    return Fernet(base64.urlsafe_b64encode(key))


class EncryptedPickleSerializer(Serializer):
    """cloudpickle, then Fernet (AES-128-CBC + HMAC-SHA256)."""

    type: Literal["privacy-ops-encrypted-pickle"] = "privacy-ops-encrypted-pickle"

    def dumps(self, obj: Any) -> bytes:
        return fernet().encrypt(cloudpickle.dumps(obj))

    def loads(self, blob: bytes) -> Any:
        return cloudpickle.loads(fernet().decrypt(blob))

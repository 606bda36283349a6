"""Typed flow parameters: the Prefect UI renders them as forms, and the server rejects invalid input before a run.

The only personal data that ever enters Prefect is what a person types here at intake (an email address); after
intake every step works with the request id.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from privacy_ops.lifecycle.requests import Regulation

EMAIL_PATTERN = r"^[^@\s]+@[^@\s]+\.[^@\s]+$"


class SubjectIntake(BaseModel):
    """Who the request is about: an email address or an account id (exactly one), and under which law."""

    model_config = ConfigDict(extra="forbid")

    email: str | None = Field(
        default=None,
        description="The requester's email address, as they gave it",
        pattern=EMAIL_PATTERN,
        max_length=320,
    )
    account_id: int | None = Field(default=None, description="Or the CellCMS account id", gt=0)
    regulation: Regulation = Field(default=Regulation.GDPR, description="GDPR (30-day deadline) or CCPA (45 days)")
    requested_by: str = Field(
        default="compliance-ops",
        description="Who took the request (operator or channel)",
        min_length=1,
        max_length=100,
    )

    @model_validator(mode="after")
    def _one_identity(self) -> SubjectIntake:
        if (self.email is None) == (self.account_id is None):
            raise ValueError("give exactly one of email or account_id")
        return self

    def identity(self) -> str:
        """The identity as the audit log hashes it."""
        return f"email:{self.email}" if self.email is not None else f"account:{self.account_id}"

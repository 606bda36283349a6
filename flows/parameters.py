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


REQUEST_ID_PATTERN = r"^req_[0-9a-f]{10}$"


class LiftRestriction(BaseModel):
    """Lift a restriction of processing granted earlier: the person is told first (GDPR art. 18(3))."""

    model_config = ConfigDict(extra="forbid")

    restriction_request_id: str = Field(
        description="The completed restriction request to lift, e.g. req_7f3a9c21b0", pattern=REQUEST_ID_PATTERN
    )
    reason: str = Field(
        description="Why it is lifted (told to the person; no personal data)", min_length=10, max_length=500
    )
    lifted_by: str = Field(description="The operator lifting it", min_length=1, max_length=100)


class Objection(BaseModel):
    """What the person objects to (GDPR art. 21): purposes as the data map names them."""

    model_config = ConfigDict(extra="forbid")

    purposes: list[str] = Field(
        description="Purposes of processing objected to, as the data map names them: analytics, marketing, "
        "product_research",
        min_length=1,
        max_length=10,
    )

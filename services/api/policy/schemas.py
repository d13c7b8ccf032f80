"""Bodies and answers of the scoring-policy API."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from services.scorer.engine.policy import ScoringPolicy

_POLICY_EXAMPLE: dict[str, Any] = {
    "tiers": {"key_threshold": 65.0, "margin_floor": 0.15},
    "risk": {"horizon_days": 120},
}


class PolicyDraft(BaseModel):
    """A policy body to preview. Fields left out take their defaults (not the active values)."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"policy": _POLICY_EXAMPLE}]}
    )

    policy: ScoringPolicy = Field(
        description="The whole policy body; every field left out takes its documented default."
    )


class PolicyUpdate(PolicyDraft):
    """A new policy version: the body and why it changed."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"policy": _POLICY_EXAMPLE, "comment": "Raise the key bar after the 2026 review."}
            ]
        },
    )

    comment: str | None = Field(
        default=None,
        min_length=1,
        max_length=500,
        pattern=r"^[^\x00-\x08\x0b-\x1f\x7f]+$",
        description="Why the policy changed (1-500 characters), kept with the version.",
    )


class PolicyVersion(BaseModel):
    """A stored version of the scoring policy."""

    version: int = Field(description="Grows by one with every published change.", examples=[2])
    active: bool = Field(description="Whether the scorer uses this version now.")
    policy: ScoringPolicy
    comment: str | None = Field(examples=["Raise the key bar after the 2026 review."])
    created_by: str | None = Field(
        description="Name of the API key that published it ('kam' for the built-in default).",
        examples=["policy-admin"],
    )
    created_at: datetime

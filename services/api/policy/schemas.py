"""Bodies and answers of the scoring-policy API."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from shared.policy import ScoringPolicy


def _strictly(body: Any) -> Any:
    # The engine's model is lax (a true would pass as the weight 1.0, "90" as 90 days); a body
    # sent over HTTP is held to its JSON types, with the same errors and paths as otherwise.
    if isinstance(body, dict):
        return ScoringPolicy.model_validate_json(json.dumps(body), strict=True)
    return body


StrictPolicy = Annotated[ScoringPolicy, BeforeValidator(_strictly)]

_POLICY_EXAMPLE: dict[str, Any] = {
    "tiers": {"key_threshold": 65.0, "margin_floor": 0.15},
    "risk": {"horizon_days": 120},
}


class PolicyDraft(BaseModel):
    """A policy body to preview. Fields left out take their defaults (not the active values)."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"policy": _POLICY_EXAMPLE}]}
    )

    policy: StrictPolicy = Field(
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

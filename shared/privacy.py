"""Which fields hold personal data, for erasure, export and the retention of raw events.

The migration ``privacy`` names the same keys in its triggers (tests/test_privacy.py checks
that they agree).
"""

from __future__ import annotations

# Personal fields of a contact (its row's columns and its event's keys); ``role`` is not.
CONTACT_PII_FIELDS: tuple[str, ...] = ("name", "email", "phone", "address", "gender", "birth_year")

# Free text of an interaction, which may name or describe a person.
INTERACTION_PII_FIELDS: tuple[str, ...] = ("summary",)


def without_pii(event_type: str, payload: dict[str, object] | None) -> dict[str, object] | None:
    """A raw event body with its personal fields left out."""
    if payload is None:
        return None
    if event_type == "contact":
        return {k: v for k, v in payload.items() if k not in CONTACT_PII_FIELDS}
    if event_type == "interaction":
        return {k: v for k, v in payload.items() if k not in INTERACTION_PII_FIELDS}
    return payload

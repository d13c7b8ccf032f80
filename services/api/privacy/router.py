"""Privacy endpoints: erase a contact's personal data (GDPR art. 17), export everything held
about an account (art. 15 and 20)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import structlog
from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from services.api.body import JsonBodyRoute
from services.api.deps import SessionDep, require
from services.api.errors import NotFound, problems
from services.api.keys.service import Principal
from services.api.privacy.service import account_exists, erase_contact, export_account
from shared.enums import Scope
from shared.schemas import ExternalId

log = structlog.get_logger(__name__)

router = APIRouter(prefix="/v1", tags=["privacy"], route_class=JsonBodyRoute)

Eraser = Annotated[Principal, Depends(require(Scope.pii_erase))]
Reader = Annotated[Principal, Depends(require(Scope.accounts_read))]


class ErasureOut(BaseModel):
    """What an erasure did. It names no personal data."""

    erasure_id: int = Field(description="The erasure record kept as proof.")
    contact_external_id: str
    account_external_id: str | None
    erased_at: datetime
    fields: list[str] = Field(
        description="The contact's personal fields that held a value and were erased."
    )
    raw_events: int = Field(
        description="Raw event records whose personal fields were erased (the contact's events "
        "and its interactions' summaries)."
    )
    interaction_summaries: int = Field(description="Interaction summaries erased.")


@router.delete(
    "/contacts/{external_id}",
    summary="Erase a contact's personal data",
    responses=problems(401, 403, 404, 422, 503),
)
async def delete_contact(
    external_id: Annotated[ExternalId, Path(description="The producer's id of the contact.")],
    session: SessionDep,
    principal: Eraser,
) -> ErasureOut:
    """Erases the contact's personal data everywhere KAM keeps it: the contact (name, email,
    phone, address, gender, birth year), the raw records of every event that carried them, and
    the free-text summaries of the contact's interactions (in the interactions and in their raw
    records). The contact's id and role, and its interactions' facts, stay. An erasure record
    without personal data is kept. Needs scope `pii:erase`.

    A later event for an erased contact does not bring the personal data back: it is stored
    and applied without its personal fields (and an interaction with it without its summary).
    """
    erasure = await erase_contact(session, external_id=external_id, api_key_id=principal.key_id)
    log.info("contact_erased", erasure_id=erasure.id, key_id=principal.key_id)
    return ErasureOut(
        erasure_id=erasure.id,
        contact_external_id=erasure.contact_external_id,
        account_external_id=erasure.account_external_id,
        erased_at=erasure.erased_at,
        fields=erasure.fields,
        raw_events=erasure.raw_events,
        interaction_summaries=erasure.interaction_summaries,
    )


@router.get(
    "/accounts/{external_id}/export",
    summary="Export everything held about an account",
    responses={
        200: {
            "description": "One JSON document, streamed.",
            "content": {"application/json": {"schema": {"type": "object"}}},
        },
        **problems(401, 403, 404, 422, 503),
    },
    response_class=StreamingResponse,
)
async def export(
    external_id: Annotated[ExternalId, Path(description="The producer's id of the account.")],
    request: Request,
    session: SessionDep,
    principal: Reader,
) -> StreamingResponse:
    """Streams one JSON document with everything KAM holds about the account: its master data,
    contacts, orders, interactions, payments, score history, tier changes and the raw records of
    its events (their bodies until the retention period ends, then their hashes). Personal
    data (contacts' personal fields, interaction summaries, and those fields in raw records) is
    included only for keys with `pii:read`; `pii_included` says which. Needs `accounts:read`.
    """
    if not await account_exists(session, external_id):
        raise NotFound(f"No account '{external_id}'.")
    document = export_account(
        request.app.state.sessionmaker, external_id, with_pii=principal.has(Scope.pii_read)
    )
    return StreamingResponse(
        document,
        media_type="application/json",
        headers={"Content-Disposition": 'attachment; filename="account-export.json"'},
    )

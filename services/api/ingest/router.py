"""Ingestion endpoints. Every accepted event is durable in Postgres before the 202."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request, status
from pydantic import TypeAdapter, ValidationError

from services.api.body import JsonBodyRoute, json_syntax_problem
from services.api.deps import SessionDep, require
from services.api.errors import (
    FieldError,
    Unprocessable,
    field_errors,
    problems,
    summarize,
)
from services.api.ingest.reuse import refuse_reused, reuse_error, reused_positions
from services.api.ingest.schemas import (
    BatchResult,
    EventAck,
    ItemResult,
    batch_item_event_id,
)
from services.api.ingest.service import AnyEvent, event_type, ingest_events, received_document
from services.api.keys.service import Principal
from services.api.observability import count_ingested
from shared.enums import EventType, ItemStatus, Scope
from shared.schemas import (
    AccountData,
    AccountEvent,
    ContactData,
    Event,
    ExternalId,
    InteractionData,
    ManagerData,
    ManagerEvent,
    OrderData,
    PaymentData,
    StrictModel,
)
from shared.settings import Settings

router = APIRouter(prefix="/v1", tags=["ingestion"], route_class=JsonBodyRoute)

Writer = Annotated[Principal, Depends(require(Scope.events_write))]
PathId = Annotated[ExternalId, Path(description="The producer's id of the entity.")]
_ERRORS = problems(400, 401, 403, 409, 413, 415, 422, 429, 503)
_event_adapter: TypeAdapter[Any] = TypeAdapter(Event)


async def _ingest_one(session: SessionDep, principal: Principal, event: AnyEvent) -> EventAck:
    # The request writes nothing else: the event may be its own transaction.
    [outcome] = await ingest_events(
        session, [event], api_key_id=principal.key_id, commit_alone=True
    )
    if outcome is ItemStatus.duplicate:
        await refuse_reused(session, event)
    count_ingested([(event_type(event).value, outcome.value)])
    return EventAck(event_id=event.event_id, status=outcome)


def _with_path_id(
    model: type[AccountEvent] | type[ManagerEvent], kind: str, body: Any, external_id: str
) -> Any:
    try:
        fields = body.model_dump(exclude_unset=True)
        return model.model_validate({**fields, "type": kind, "external_id": external_id})
    except ValidationError as exc:
        errors = field_errors([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()])
        raise Unprocessable(summarize(errors), errors=errors) from None


@router.put(
    "/accounts/{external_id}",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Create or update an account's master data",
    responses=_ERRORS,
)
async def put_account(
    external_id: PathId, body: AccountData, session: SessionDep, principal: Writer
) -> EventAck:
    """Upserts the account's master data. Needs scope `events:write`.

    An account first named by another event (an order, say) exists as a stub until this call
    fills it in. `parent_external_id` makes it a subsidiary of a group (created as a stub if
    unknown); `manager_external_id` assigns its key-account manager. Tier, score and risk are
    the scorer's: they cannot be sent. A `version` not newer than the one stored answers
    `stale` and changes nothing.
    """
    event = _with_path_id(AccountEvent, "account", body, external_id)
    return await _ingest_one(session, principal, event)


@router.put(
    "/managers/{external_id}",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Create or update a key-account manager",
    responses=_ERRORS,
)
async def put_manager(
    external_id: PathId, body: ManagerData, session: SessionDep, principal: Writer
) -> EventAck:
    """Upserts a key-account manager; `capacity` (default 9) is how many key accounts they can
    look after. Needs scope `events:write`."""
    event = _with_path_id(ManagerEvent, "manager", body, external_id)
    return await _ingest_one(session, principal, event)


@router.post(
    "/orders",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Record an order, or update it",
    responses=_ERRORS,
)
async def post_order(body: OrderData, session: SessionDep, principal: Writer) -> EventAck:
    """Records an order with its net amount, cost and category lines. A later event for the same
    `external_id` with a higher version updates it (a cancellation or a return). An unknown
    `account_external_id` creates a stub account. Needs scope `events:write`."""
    return await _ingest_one(session, principal, body)


@router.post(
    "/contacts",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Record a contact person, or update one",
    responses=_ERRORS,
)
async def post_contact(body: ContactData, session: SessionDep, principal: Writer) -> EventAck:
    """Records a person at an account. Name, email, phone, address, gender and birth year are
    personal data: they are returned only to keys with `pii:read` and never logged. Needs scope
    `events:write`."""
    return await _ingest_one(session, principal, body)


@router.post(
    "/interactions",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Record an interaction: a call, visit, complaint or survey",
    responses=_ERRORS,
)
async def post_interaction(
    body: InteractionData, session: SessionDep, principal: Writer
) -> EventAck:
    """Records a contact with the account. Surveys carry `satisfaction` from 1 (very
    dissatisfied) to 5 (very satisfied); complaints are `kind: complaint`. Needs scope
    `events:write`."""
    return await _ingest_one(session, principal, body)


@router.post(
    "/payments",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Record an invoice and its payment",
    responses=_ERRORS,
)
async def post_payment(body: PaymentData, session: SessionDep, principal: Writer) -> EventAck:
    """Records an invoice (`due_at`) and, once known, when it was paid (`paid_at`): send the
    invoice again with a higher version when it is paid. Needs scope `events:write`."""
    return await _ingest_one(session, principal, body)


@router.post(
    "/events",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Send a mixed batch of events",
    responses=problems(400, 401, 403, 413, 415, 422, 429, 503),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/BatchRequest"}}
            },
        }
    },
)
async def post_events(request: Request, session: SessionDep, principal: Writer) -> BatchResult:
    """Accepts up to 1,000 events or 1 MiB in one call, each with a `type` (`account`,
    `manager`, `order`, `contact`, `interaction`, `payment`) and the fields of its typed
    endpoint (with `external_id` in the body for accounts and managers).

    Each event stands alone: valid events are stored, invalid ones come back `rejected` with
    their errors, and nothing of a rejected event is written. Duplicates (a seen `event_id`)
    and stale versions change nothing. Needs scope `events:write`.
    """
    settings: Settings = request.app.state.settings
    raw = await request.body()
    whole = _valid_batch(raw, settings.max_batch_events)
    if whole is not None:
        events, received = whole
        types = [event_type(event).value for event in events]
        statuses = await ingest_events(
            session, events, api_key_id=principal.key_id, received=received
        )
        reused = await reused_positions(
            session,
            [
                (event.event_id, index)
                for index, (event, outcome) in enumerate(zip(events, statuses, strict=True))
                if outcome is ItemStatus.duplicate
            ],
            received,
        )
        results = [
            _result(index, event.event_id, outcome, index in reused)
            for index, (event, outcome) in enumerate(zip(events, statuses, strict=True))
        ]
    else:
        items = _parse_envelope(raw, settings.max_batch_events)
        types = [_item_type(item) for item in items]
        results = await _ingest_item_by_item(session, principal, items)
    counts = {s: 0 for s in ItemStatus}
    for r in results:
        counts[r.status] += 1
    count_ingested((types[r.index], r.status.value) for r in results)
    return BatchResult(
        accepted=counts[ItemStatus.accepted] + counts[ItemStatus.stale],
        stale=counts[ItemStatus.stale],
        duplicates=counts[ItemStatus.duplicate],
        rejected=counts[ItemStatus.rejected],
        results=results,
    )


class _WholeBatch(StrictModel):
    events: list[Event]


def _valid_batch(raw: bytes, max_events: int) -> tuple[Sequence[AnyEvent], str] | None:
    """The events of a batch valid as a whole, and the body as text; None when anything in it
    is not, and the batch must be taken apart (``_parse_envelope``) to say what.

    Parsing and validating the body in one call, and keeping its text for the raw records,
    saves parsing it into Python objects and encoding every item again. An item that passes
    validation holds nothing Postgres's JSON refuses (no NaN, no NUL: every number and string
    is bounded), so the database can take the items out of the text as they are.
    """
    try:
        events: Sequence[AnyEvent] = _WholeBatch.model_validate_json(raw).events
        text = raw.decode()
    except (ValidationError, UnicodeDecodeError):
        return None
    if not 0 < len(events) <= max_events:
        return None
    return events, text


async def _ingest_item_by_item(
    session: SessionDep, principal: Principal, items: list[Any]
) -> list[ItemResult]:
    """A batch with an invalid item: the valid ones are stored, the others rejected."""
    results: list[ItemResult] = []
    valid: list[tuple[int, AnyEvent]] = []
    payloads: list[Any] = []
    for index, item in enumerate(items):
        try:
            valid.append((index, _event_adapter.validate_python(item)))
            payloads.append(item)
        except ValidationError as exc:
            errors = field_errors(
                [{**e, "loc": ("events", index, *e["loc"])} for e in exc.errors()]
            )
            results.append(
                ItemResult(
                    index=index,
                    event_id=batch_item_event_id(item),
                    status=ItemStatus.rejected,
                    errors=errors,
                )
            )
    document = received_document(payloads)
    statuses = await ingest_events(
        session, [event for _, event in valid], api_key_id=principal.key_id, received=document
    )
    reused = await reused_positions(
        session,
        [
            (event.event_id, position)
            for position, ((_, event), outcome) in enumerate(zip(valid, statuses, strict=True))
            if outcome is ItemStatus.duplicate
        ],
        document,
    )
    results.extend(
        _result(index, event.event_id, outcome, position in reused)
        for position, ((index, event), outcome) in enumerate(zip(valid, statuses, strict=True))
    )
    results.sort(key=lambda r: r.index)
    return results


def _item_type(item: Any) -> str:
    kind = item.get("type") if isinstance(item, dict) else None
    return kind if kind in _EVENT_TYPES else "unknown"


_EVENT_TYPES = frozenset(t.value for t in EventType)


def _result(index: int, event_id: str, outcome: ItemStatus, reused: bool) -> ItemResult:
    if outcome is ItemStatus.duplicate and reused:
        return ItemResult(
            index=index,
            event_id=event_id,
            status=ItemStatus.rejected,
            errors=[reuse_error(f"events.{index}.event_id")],
        )
    return ItemResult(index=index, event_id=event_id, status=outcome)


def _parse_envelope(raw: bytes, max_events: int) -> list[Any]:
    try:
        body = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        raise json_syntax_problem(raw) or Unprocessable(
            "The body is not valid JSON.",
            errors=[FieldError(field="body", message="invalid JSON", type="json_invalid")],
        ) from None
    if not isinstance(body, dict) or not isinstance(body.get("events"), list):
        raise Unprocessable(
            "The body must be an object with an 'events' array.",
            errors=[
                FieldError(field="body.events", message="an array is required", type="missing")
            ],
        )
    unknown = sorted(set(body) - {"events"})
    if unknown:
        raise Unprocessable(
            f"Unknown field(s): {', '.join(unknown)}.",
            errors=[
                FieldError(
                    field=f"body.{name}",
                    message="Extra inputs are not permitted",
                    type="extra_forbidden",
                )
                for name in unknown
            ],
        )
    items: list[Any] = body["events"]
    if not items:
        raise Unprocessable(
            "The batch is empty.",
            errors=[
                FieldError(
                    field="body.events", message="at least one event is required", type="too_short"
                )
            ],
        )
    if len(items) > max_events:
        raise Unprocessable(
            f"The batch holds {len(items)} events; the limit is {max_events}.",
            errors=[
                FieldError(
                    field="body.events", message=f"at most {max_events} events", type="too_long"
                )
            ],
        )
    return items

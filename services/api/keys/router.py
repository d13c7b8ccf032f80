"""API key administration over HTTP (scope `admin`); the same as `kam keys ...`."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request, status
from pydantic import BaseModel, ConfigDict, Field, field_validator

from services.api.body import JsonBodyRoute
from services.api.deps import SessionDep, require
from services.api.errors import NotFound, problems
from services.api.keys.service import (
    Principal,
    create_api_key,
    list_api_keys,
    parse_scopes,
    revoke_api_key,
)
from shared.enums import Scope
from shared.models import ApiKey

router = APIRouter(prefix="/v1/api-keys", tags=["api keys"], route_class=JsonBodyRoute)
Admin = Annotated[Principal, Depends(require(Scope.admin))]


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100, pattern=r"^[^\x00-\x1f]+$", examples=["erp"])
    scopes: list[Scope] = Field(min_length=1, examples=[["events:write"]])
    manager: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        pattern=r"^[^\x00-\x1f]+$",
        description="A manager's external id: the key then sees, lists and exports only that "
        "manager's accounts.",
        examples=["M-01"],
    )

    @field_validator("scopes")
    @classmethod
    def _unique(cls, scopes: list[Scope]) -> list[Scope]:
        return sorted(set(scopes))


class KeyOut(BaseModel):
    id: int
    name: str
    prefix: str = Field(description="Identifies the key in logs and lists; not a secret.")
    scopes: list[Scope]
    manager: str | None = Field(description="The manager whose accounts alone the key sees.")
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None

    @classmethod
    def of(cls, key: ApiKey) -> KeyOut:
        return cls(
            id=key.id,
            name=key.name,
            prefix=key.prefix,
            scopes=parse_scopes(key.scopes),
            manager=key.manager_external_id,
            created_at=key.created_at,
            last_used_at=key.last_used_at,
            revoked_at=key.revoked_at,
        )


class KeyCreated(KeyOut):
    key: str = Field(description="The key itself. Shown this once; only its hash is kept.")


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    summary="Create an API key",
    responses=problems(400, 401, 403, 422, 503),
)
async def create_key(body: KeyCreate, session: SessionDep, _: Admin) -> KeyCreated:
    """Creates a key with the given scopes and returns it once. Needs scope `admin`."""
    key, plaintext = await create_api_key(
        session, name=body.name, scopes=body.scopes, manager=body.manager
    )
    await session.refresh(key)
    return KeyCreated(**KeyOut.of(key).model_dump(), key=plaintext)


@router.get("", summary="List API keys", responses=problems(401, 403, 503))
async def list_keys(session: SessionDep, _: Admin) -> list[KeyOut]:
    """Every key with its scopes and when it was last used; never the key itself."""
    return [KeyOut.of(k) for k in await list_api_keys(session)]


@router.delete(
    "/{prefix}", summary="Revoke an API key", responses=problems(401, 403, 404, 422, 503)
)
async def revoke_key(
    prefix: Annotated[str, Path(pattern=r"^[0-9a-f]{8}$", description="The key's prefix.")],
    request: Request,
    session: SessionDep,
    _: Admin,
) -> KeyOut:
    """Revokes the key: calls with it fail with 401 within seconds. Needs scope `admin`."""
    key = await revoke_api_key(session, key=prefix)
    if key is None:
        raise NotFound(f"No API key with prefix {prefix!r}.")
    request.app.state.key_verifier.forget(key.id)
    return KeyOut.of(key)

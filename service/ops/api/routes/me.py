"""The caller's own account: who am I, and my API tokens (README "Users and roles").

A named user creates API tokens for scripts here — shown once in the response, stored as a hash, listed
without their values, revocable. The service token and `api.auth = false` have no account.
"""
from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Body, HTTPException, Path, status
from pydantic import BaseModel, ConfigDict, Field

from dicom_fusion.service.ops.api.deps import ANONYMOUS, SERVICE, ContextDep, PrincipalDep
from dicom_fusion.service.storage.users import Principal, Users

router = APIRouter(prefix="/api/me", tags=["account"])


class MeOut(BaseModel):
    username: str
    display_name: str
    role: str
    organization: str


class TokenIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field("api", min_length=1, max_length=64, description="what the token is for")


class NewTokenOut(BaseModel):
    id: int
    name: str
    token: str = Field(description="shown this once: store it now")


class TokenOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    name: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


def _named(who: Principal) -> Principal:
    if who in (SERVICE, ANONYMOUS):
        raise HTTPException(status.HTTP_409_CONFLICT, f"{who.display_name} has no account; sign in as a user")
    return who


@router.get("", response_model=MeOut, summary="The signed-in user or the token's user")
def me(who: PrincipalDep) -> MeOut:
    return MeOut(username=who.username, display_name=who.display_name, role=str(who.role),
                 organization=who.organization)


@router.get("/tokens", response_model=list[TokenOut], summary="My API tokens (without their values)")
def my_tokens(ctx: ContextDep, who: PrincipalDep) -> list[TokenOut]:
    return [TokenOut.model_validate(t) for t in Users(ctx.ledger).tokens(_named(who).username)]


@router.post("/tokens", response_model=NewTokenOut, status_code=status.HTTP_201_CREATED,
             summary="Create an API token for myself; the response is the only time it is shown")
def create_token(ctx: ContextDep, who: PrincipalDep, body: Annotated[TokenIn, Body()] = TokenIn()) -> NewTokenOut:
    name = _named(who).username
    token_id, value = Users(ctx.ledger).create_token(name, body.name, by=name)
    return NewTokenOut(id=token_id, name=body.name, token=value)


@router.delete("/tokens/{token_id}", status_code=status.HTTP_204_NO_CONTENT, summary="Revoke one of my API tokens",
               responses={409: {"description": "no such active token of yours"}})
def revoke_token(ctx: ContextDep, who: PrincipalDep, token_id: Annotated[int, Path(ge=1, le=2**62)]) -> None:
    Users(ctx.ledger).revoke_own_token(_named(who).username, token_id)

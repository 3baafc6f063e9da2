"""Users' bearer tokens (admin only): create one (shown once), list them, revoke one."""

from __future__ import annotations

from fastapi import APIRouter

from livemig.control import tokens
from livemig.control.services import ServicesDep
from livemig.control.store import TokenRecord
from livemig.wire.lmo import TokenCreate, TokenCreated, TokenView

router = APIRouter()


def _view(record: TokenRecord) -> TokenView:
    return TokenView(id=record.id, name=record.name, role=record.role, created_at=record.created_at,
                     revoked_at=record.revoked_at)  # fmt: skip


@router.post("/tokens", status_code=201)
async def create_token(body: TokenCreate, services: ServicesDep) -> TokenCreated:
    record, token = tokens.issue(services.store, body.name, body.role)
    return TokenCreated(**_view(record).model_dump(), token=token)


@router.get("/tokens")
async def list_tokens(services: ServicesDep) -> list[TokenView]:
    return [_view(r) for r in services.store.tokens()]


@router.delete("/tokens/{token_id}")
async def revoke_token(token_id: str, services: ServicesDep) -> TokenView:
    return _view(services.store.revoke_token(token_id))

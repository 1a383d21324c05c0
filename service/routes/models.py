"""GET /v1/models and /v1/models/{id}: the base and every adapter the caller's key may use.

Adapters are listed whether loaded or only present under the adapter root (served on first use), each
with `parent` = the base; a key sees only what its tenant may use.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from service.auth import tenant_of
from service.errors import ModelNotFound
from service.protocol.models import ModelCard, ModelList
from service.routes import error_responses

router = APIRouter()


def _cards(request: Request) -> list[ModelCard]:
    state = request.app.state
    tenant = tenant_of(request)
    engine, base = state.engine, state.settings.base_name
    cards = [ModelCard(id=base, root=base, max_model_len=engine.max_model_len)] if tenant.base else []
    for name in state.registry.available():
        if tenant.may_use_adapter(name):
            cards.append(ModelCard(id=name, root=name, parent=base, max_model_len=engine.max_model_len))
    return cards


@router.get("/v1/models", response_model=ModelList, responses=error_responses(401))
async def list_models(request: Request) -> ModelList:
    return ModelList(data=_cards(request))


@router.get("/v1/models/{model_id}", response_model=ModelCard, responses=error_responses(401, 404))
async def get_model(model_id: str, request: Request) -> ModelCard:
    for card in _cards(request):
        if card.id == model_id:
            return card
    raise ModelNotFound.named(model_id)

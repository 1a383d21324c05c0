"""GET /playground (the page and its two assets, public) and GET /playground/api/adapters (the console's
cards, for the caller's key). Off with --no-playground. See service/serving/playground.py."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from service.auth import tenant_of
from service.routes import error_responses
from service.serving.playground import HEADERS, TYPES, cards

router = APIRouter(tags=["playground"])


def _content(name: str) -> dict:
    return {200: {"description": f"the playground's {name}", "content": {TYPES[name].split(";")[0]: {
        "schema": {"type": "string"}}}}}


def _asset(request: Request, name: str) -> Response:
    return Response(request.app.state.playground.files[name], media_type=TYPES[name], headers=HEADERS)


@router.get("/playground", response_class=Response, responses=_content("index.html"))
async def page(request: Request) -> Response:
    return _asset(request, "index.html")


@router.get("/playground/app.js", response_class=Response, responses=_content("app.js"))
async def script(request: Request) -> Response:
    return _asset(request, "app.js")


@router.get("/playground/style.css", response_class=Response, responses=_content("style.css"))
async def style(request: Request) -> Response:
    return _asset(request, "style.css")


@router.get("/playground/api/adapters", responses=error_responses(401))
async def adapter_cards(request: Request) -> dict:
    state = request.app.state
    resident = await state.engine.resident_ids()
    keys = {info.name for info in state.engine.adapters() if info.engine_id in resident}
    return cards(tenant_of(request), state.registry, state.metrics, state.settings.base_name, keys)

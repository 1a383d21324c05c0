"""POST /v1/responses (the Responses API; nothing is stored)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from service.protocol.responses import Response, ResponsesRequest
from service.routes import GENERATION_RESPONSES, answer, requester

router = APIRouter()


@router.post("/v1/responses", response_model=Response, responses=GENERATION_RESPONSES)
async def responses(body: ResponsesRequest, request: Request):
    return answer(await request.app.state.responses.handle(body, requester(request)), body.stream)

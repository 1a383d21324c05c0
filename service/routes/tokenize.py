"""POST /tokenize and /detokenize (vLLM's paths and shapes)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from service.protocol.tokenize import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from service.routes import error_responses, requester

router = APIRouter()


@router.post("/tokenize", response_model=TokenizeResponse, response_model_exclude_none=True,
             responses=error_responses(400, 401, 404, 413))
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    return await request.app.state.tokenize.tokenize(body, requester(request))


@router.post("/detokenize", response_model=DetokenizeResponse, responses=error_responses(400, 401, 404))
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    return request.app.state.tokenize.detokenize(body, requester(request))

"""POST /v1/responses (the Responses API) and the stored responses: GET / DELETE /v1/responses/{id}, GET
/v1/responses/{id}/input_items, POST /v1/responses/{id}/cancel (a background response), GET
/v1/responses/{id}?stream=true (a streamed background response's events, resumable); a tenant reaches only
its own (see service.serving.response_store)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Query, Request

from service.auth import tenant_of
from service.protocol.responses import InputItemList, Response, ResponseDeleted, ResponsesRequest
from service.routes import GENERATION_RESPONSES, answer, error_responses, requester

router = APIRouter()


@router.post("/v1/responses", response_model=Response, responses=GENERATION_RESPONSES)
async def responses(body: ResponsesRequest, request: Request):
    return answer(await request.app.state.responses.handle(body, requester(request)), body.stream)


@router.get("/v1/responses/{response_id}", response_model=Response, responses={
    200: {"description": "the stored response; with `stream=true`, a streamed background response's events "
                         "(after `starting_after`) as server-sent events",
          "content": {"text/event-stream": {"schema": {"type": "string"}}}},
    **error_responses(400, 401, 404)})
async def get_response(response_id: str, request: Request, stream: bool = False,
                       starting_after: int | None = Query(None, ge=0)):
    service = request.app.state.responses
    if stream:
        return answer(service.events(response_id, tenant_of(request), starting_after), True)
    return service.stored(response_id, tenant_of(request)).response


@router.post("/v1/responses/{response_id}/cancel", response_model=Response, responses=error_responses(400, 401, 404))
async def cancel_response(response_id: str, request: Request):
    return await request.app.state.responses.cancel(response_id, tenant_of(request))


@router.delete("/v1/responses/{response_id}", response_model=ResponseDeleted, responses=error_responses(401, 404))
async def delete_response(response_id: str, request: Request) -> ResponseDeleted:
    request.app.state.responses.delete(response_id, tenant_of(request))
    return ResponseDeleted(id=response_id)


@router.get("/v1/responses/{response_id}/input_items", response_model=InputItemList,
            responses=error_responses(400, 401, 404))
async def input_items(response_id: str, request: Request, limit: int = Query(20, ge=1, le=100),
                      order: Literal["asc", "desc"] = "desc", after: str | None = None) -> InputItemList:
    return request.app.state.responses.input_items(response_id, tenant_of(request), limit, order, after)

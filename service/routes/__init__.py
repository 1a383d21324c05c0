"""Thin HTTP routers: parse, call `serving/`, return. `GENERATION_RESPONSES` tells the OpenAPI document what a
generating endpoint sends besides its JSON body: the SSE stream, and every OpenAI-shaped error status."""

from fastapi.responses import StreamingResponse

from service.protocol.models import ErrorResponse

_ERRORS = {
    400: "invalid request (a parameter, an image, the context length, a constraint that does not compile)",
    401: "missing or wrong API key",
    403: "this key may not use the admin API",
    404: "the model does not exist, or this key may not use it",
    413: "the body or an image is over its byte or pixel limit",
    429: "a tenant's or adapter's limit, or too many requests in flight (Retry-After says when to retry)",
    499: "the client closed the connection while the request waited for an engine slot (logged; nobody reads it)",
    500: "an unexpected server error",
    503: "not ready, draining, the engine is restarting, or this adapter's files are unavailable (Retry-After)",
}


def error_responses(*statuses: int) -> dict:
    """The OpenAPI entries of the OpenAI-shaped errors an endpoint answers."""
    return {status: {"model": ErrorResponse, "description": _ERRORS[status]} for status in statuses}


GENERATION_RESPONSES: dict = {
    200: {"description": "the answer; with `stream: true`, server-sent events instead",
          "content": {"text/event-stream": {"schema": {"type": "string"}}}},
    **error_responses(400, 401, 404, 413, 429, 499, 500, 503),
}


def requester(request):
    """The caller's tenant, with the request's disconnect check made visible to the fair-share wait (a request
    whose client has gone never reaches the engine: service.serving.generation.CLIENT_GONE)."""
    from service.auth import tenant_of
    from service.serving.generation import CLIENT_GONE

    CLIENT_GONE.set(request.is_disconnected)
    return tenant_of(request)


def answer(result, stream: bool):
    """A generating endpoint's result: the JSON model, or the SSE body iterator as an event stream."""
    if stream:
        return StreamingResponse(result, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return result

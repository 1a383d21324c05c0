"""Operations endpoints: /health (liveness), /ready (readiness), /metrics (Prometheus text)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from service.errors import APIError, NotReady
from service.metrics import CONTENT_TYPE
from service.routes import error_responses

router = APIRouter()


@router.get("/health", responses=error_responses(500, 503))
async def health(request: Request) -> dict:
    engine = request.app.state.engine
    if request.app.state.engine_dead:
        raise NotReady("engine is dead; the process is exiting")
    try:
        await engine.check_health()
    except APIError:
        raise
    except Exception as exc:
        raise NotReady(f"engine unhealthy: {exc}") from exc
    return {"status": "ok"}


@router.get("/ready", responses=error_responses(503))
async def ready(request: Request) -> dict:
    state = request.app.state
    retry = {"Retry-After": str(state.settings.retry_after_s)}
    if state.drain.draining:
        raise NotReady("not ready: the server is draining before shutdown", headers=retry)
    if not state.ready:
        raise NotReady("not ready: the engine or its adapters are still loading", headers=retry)
    golden_failures = state.registry.golden_failures()
    if golden_failures:
        failed = ", ".join(sorted(golden_failures))
        raise NotReady(f"not ready: golden-sample checks failed for adapter(s) {failed}", headers=retry)
    await state.engine.check_health()
    # An adapter whose files went away answers 503 itself; the replica still serves every other one.
    unavailable = state.registry.unavailable()
    return {"status": "ready", "adapters": [n for n in state.registry.names() if n not in unavailable],
            "unavailable": unavailable}


@router.get("/metrics", response_class=Response, responses={200: {
    "description": "Prometheus text exposition (vlora's series and vLLM's)",
    "content": {CONTENT_TYPE.split(";")[0]: {"schema": {"type": "string"}}}}})
async def metrics(request: Request) -> Response:
    state = request.app.state
    fair, store = state.chat.fair, state.responses.store
    ours = state.metrics.exposition(engine_unfinished=state.engine.unfinished_requests(),
                                    fair_waiting=fair.waiting() if fair is not None else 0,
                                    loaded=state.registry.names(), max_lora=state.settings.max_loras,
                                    stored=(len(store), store.bytes) if store is not None else (0, 0))
    return Response(ours + state.engine.engine_metrics(), media_type=CONTENT_TYPE)

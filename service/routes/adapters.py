"""The admin API (admin key required): load, replace, list and unload adapters at run time.

    POST   /v1/adapters          {"name": "colors", "revision": "v3"?}  load the newest (or given) revision
                                 from the adapter root; it becomes the one new requests get
    GET    /v1/adapters          every loaded revision: name, revision, active, rank, targets, residency,
                                 load time, requests in flight; plus the names available under the root
    DELETE /v1/adapters/{name}   unload every revision of `name` (each once its requests are done)

Clients name adapters, never paths: names are checked and resolved inside the root (see store.py).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from service.auth import tenant_of
from service.errors import Forbidden
from service.routes import error_responses

router = APIRouter()


class LoadAdapter(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=128)
    revision: str | None = Field(None, min_length=1, max_length=64)


def _require_admin(request: Request) -> None:
    if not tenant_of(request).admin:
        raise Forbidden("this key may not use the admin API")


def _card(request: Request, revision, resident_ids: set[int]) -> dict:
    state = request.app.state
    info = next((a for a in state.engine.adapters() if a.name == revision.key), None)
    meta = revision.meta
    return {
        "name": revision.name,
        "revision": revision.rev,
        "active": state.registry.active.get(revision.name) is revision,
        "source": revision.source,
        "rank": meta.rank if meta else (info.rank if info else None),
        "targets": meta.targets if meta else {},
        "residency": "engine" if info is not None and info.engine_id in resident_ids else "disk",
        "loaded_at": round(revision.loaded_at, 3),
        "load_seconds": round(revision.load_seconds, 4),
        "in_flight": revision.in_flight,
        "retired": revision.retired,
        "golden_problems": revision.golden_problems,
    }


@router.get("/v1/adapters", responses=error_responses(401, 403))
async def list_adapters(request: Request) -> dict:
    _require_admin(request)
    registry = request.app.state.registry
    resident = await request.app.state.engine.resident_ids()
    data = [_card(request, r, resident) for r in sorted(registry.resident.values(), key=lambda r: r.key)]
    return {"object": "list", "data": data, "available": registry.available()}


@router.post("/v1/adapters", responses=error_responses(400, 401, 403, 404, 503))
async def load_adapter(body: LoadAdapter, request: Request) -> dict:
    _require_admin(request)
    registry = request.app.state.registry
    revision = await registry.load(body.name, body.revision)
    return _card(request, revision, await request.app.state.engine.resident_ids())


@router.delete("/v1/adapters/{name}", responses=error_responses(401, 403, 404))
async def unload_adapter(name: str, request: Request) -> dict:
    _require_admin(request)
    revisions = await request.app.state.registry.unload(name)
    return {"object": "adapter.deleted", "name": name, "revisions": [r.rev for r in revisions], "deleted": True}

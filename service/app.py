"""The FastAPI application: `create_app(settings, engine)`; all state lives on `app.state`.

The engine starts in the lifespan (uvicorn accepts connections once it is up), then the start adapters
are loaded and the app turns ready.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service.adapters.registry import AdapterRegistry
from service.engine.base import Engine
from service.errors import PayloadTooLarge, api_error_response, install_error_handlers
from service.media import MediaLimits
from service.metrics import Metrics
from service.routes import chat, models, ops
from service.serving.chat import ChatService
from service.serving.render import ChatRenderer
from service.settings import ServiceSettings

logger = logging.getLogger("vlora.app")


class BodySizeLimit:
    """ASGI middleware: refuse request bodies over `max_bytes` with a 413, by header or while streaming."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = PayloadTooLarge(f"request body exceeds the limit of {self.max_bytes} bytes")
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await api_error_response(too_large)(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise too_large
            return message

        try:
            await self.app(scope, limited_receive, send)
        except PayloadTooLarge as exc:
            await api_error_response(exc)(scope, receive, send)


def create_app(settings: ServiceSettings, engine: Engine, renderer: ChatRenderer | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await engine.start()
        app.state.chat.renderer = renderer or await asyncio.to_thread(ChatRenderer.from_pretrained, settings.model)
        app.state.ready = True
        logger.info("ready: serving %s with adapters %s", settings.base_name, [a.name for a in engine.adapters()])
        try:
            yield
        finally:
            app.state.ready = False
            await engine.shutdown()

    app = FastAPI(title="vlora", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.engine = engine
    app.state.ready = False
    app.state.metrics = Metrics(engine.unfinished_requests)
    limits = MediaLimits(
        max_image_bytes=settings.max_image_bytes,
        max_image_pixels=settings.max_image_pixels,
        fetch_timeout_s=settings.image_fetch_timeout_s,
        max_redirects=settings.image_fetch_max_redirects,
        allowlist=tuple(settings.image_url_allowlist),
    )
    registry = AdapterRegistry(settings.base_name, engine)
    app.state.chat = ChatService(engine, registry, renderer, limits, settings.max_images_per_request,
                                 app.state.metrics)
    install_error_handlers(app)
    for router in (chat.router, models.router, ops.router):
        app.include_router(router)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    return app

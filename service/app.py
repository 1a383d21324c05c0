"""The FastAPI application: `create_app(settings, engine, metrics=..., renderer=...)`; all state lives on
`app.state`, and every part is built here in dependency order (nothing is patched in later; only the HTTP
server, which wraps the app, is set afterwards as `app.state.server` by `vlora-serve`).

The engine starts in the lifespan (uvicorn accepts connections once it is up), then the start adapters
are loaded and the app turns ready. Two background tasks run beside it: a liveness watchdog (a dead
engine stops the server, and `vlora-serve` then exits non-zero so Kubernetes restarts the pod) and the
drain watcher (after SIGTERM, stop the server once requests in flight are done).
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from artifacts.manifest import BaseFingerprint, base_fingerprint
from service.adapters.registry import AdapterRegistry, parse_adapter_pairs
from service.adapters.s3store import S3AdapterStore
from service.adapters.store import AdapterStore
from service.auth import Authenticate, KeyRing, file_stamp
from service.engine.base import Engine
from service.errors import PayloadTooLarge, api_error_response, install_error_handlers
from service.lifecycle import Drain, RequestLifecycle, ShedLoad
from service.limits import FairShare, Quotas
from service.media import MediaLimits
from service.metrics import Metrics
from service.routes import adapters, chat, completions, models, ops, playground, responses, tokenize
from service.serving.chat import ChatService, VideoSampling
from service.serving.completions import CompletionService
from service.serving.golden import GoldenCheck
from service.serving.playground import PATHS as PLAYGROUND_PATHS
from service.serving.playground import Assets
from service.serving.render import ChatRenderer
from service.serving.response_store import ResponseStore
from service.serving.responses import ResponsesService
from service.serving.tokenize import TokenizeService
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


async def watch_keys(ring: KeyRing, quotas, settings: ServiceSettings) -> None:
    """Secret rotation: re-read the tenants file when its bytes change; an unreadable or invalid new file keeps
    the keys in use (and says why in the log until it is fixed)."""
    path, seen = settings.api_keys_file, file_stamp(settings.api_keys_file)
    while True:
        await asyncio.sleep(settings.keys_reload_interval_s)
        stamp = file_stamp(path)
        if stamp == seen:
            continue
        seen = stamp
        try:
            fresh = KeyRing.from_settings(settings.api_keys, settings.admin_api_keys, path)
        except ValueError as exc:
            logger.error("tenants file not reloaded; keeping the keys in use", extra={"error": str(exc)})
            continue
        ring.replace_with(fresh)
        quotas.adapter_limits = dict(fresh.adapter_limits)
        logger.info("tenants file reloaded", extra={"tenants": len({t.name for _, t in fresh.entries})})


async def watch_adapter_files(registry: AdapterRegistry, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        await asyncio.to_thread(registry.check_files)


async def watch_engine(app: FastAPI, interval_s: float) -> None:
    """Liveness watchdog: when the engine dies, mark the app dead and stop the HTTP server."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await app.state.engine.check_health()
        except Exception as exc:
            logger.error("engine is dead; stopping the server", extra={"error": str(exc)})
            app.state.engine_dead = True
            app.state.ready = False
            server = getattr(app.state, "server", None)
            if server is not None:
                server.should_exit = True
            return


def _openapi_without_422(app: FastAPI):
    """FastAPI documents a 422 for every body it validates; this server answers those 400 (see errors.py)."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            spec = build()
            for path in spec.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            app.openapi_schema = spec
        return app.openapi_schema

    return openapi


def adapter_store(settings: ServiceSettings) -> AdapterStore | S3AdapterStore:
    """The adapter root: a local folder, or object storage pulled into a local cache."""
    if settings.adapter_url:
        if settings.adapter_dir is not None:
            raise ValueError("--adapter-url and --adapter-dir are two roots: give one")
        return S3AdapterStore(settings.adapter_url, settings.adapter_cache_dir, settings.adapter_cache_bytes,
                              settings.adapter_listing_ttl_s)
    return AdapterStore(settings.adapter_dir)


def served_base_fingerprint(model: str) -> BaseFingerprint | None:
    """The served base's fingerprint (as the trainer's manifest records it), for local model folders."""
    try:
        fingerprint = base_fingerprint(model)
    except OSError:
        return None
    return fingerprint if fingerprint.config_sha256 else None


def create_app(settings: ServiceSettings, engine: Engine, *, metrics: Metrics, renderer: ChatRenderer,
               keyring: KeyRing | None = None) -> FastAPI:
    """The app around an engine that is not started yet (the lifespan starts it). `metrics` is the events
    sink the engine was built with."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await engine.start()
        await registry.start()
        tasks = [asyncio.create_task(watch_engine(app, settings.health_check_interval_s))]
        tasks.append(asyncio.create_task(watch_adapter_files(registry, settings.adapter_check_interval_s)))
        if settings.api_keys_file is not None:
            tasks.append(asyncio.create_task(watch_keys(ring, app.state.chat.quotas, settings)))
        server = getattr(app.state, "server", None)
        if server is not None:
            tasks.append(asyncio.create_task(app.state.drain.wait_and_stop(server)))
        app.state.ready = True
        logger.info("ready", extra={"model": settings.base_name, "adapters": registry.names()})
        try:
            yield
        finally:
            app.state.ready = False
            for task in tasks:
                task.cancel()
            await registry.settle()
            await engine.shutdown()

    app = FastAPI(title="vlora", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.engine = engine
    app.state.ready = False
    app.state.engine_dead = False
    app.state.drain = Drain(settings.drain_grace_s)
    app.state.metrics = metrics
    limits = MediaLimits(
        max_image_bytes=settings.max_image_bytes,
        max_image_pixels=settings.max_image_pixels,
        fetch_timeout_s=settings.image_fetch_timeout_s,
        max_redirects=settings.image_fetch_max_redirects,
        allowlist=tuple(settings.image_url_allowlist),
        max_video_bytes=settings.max_video_bytes,
    )
    registry = AdapterRegistry(
        settings.base_name, engine, golden_check=GoldenCheck(engine, renderer), events=metrics,
        store=adapter_store(settings), configured=parse_adapter_pairs(settings.adapters),
        tower_lora=settings.enable_tower_lora, base_fingerprint=served_base_fingerprint(settings.model),
        preload=settings.preload)
    app.state.registry = registry
    ring = keyring or KeyRing.from_settings(settings.api_keys, settings.admin_api_keys, settings.api_keys_file)
    if not ring.enabled:
        logger.warning("no API keys configured: every endpoint, the admin API included, is open")
    video = VideoSampling(settings.max_videos_per_request, settings.video_fps, settings.video_max_frames)
    fair = (FairShare(settings.max_running_requests or settings.max_num_seqs, batch=settings.fair_share_batch)
            if settings.fair_share and ring.enabled else None)
    app.state.chat = ChatService(engine, registry, renderer, limits, settings.max_images_per_request,
                                 metrics, settings.max_pending_requests, settings.retry_after_s, video,
                                 quotas=Quotas(ring.adapter_limits), fair=fair,
                                 cache_per_tenant=settings.prefix_cache_per_tenant)
    app.state.completions = CompletionService(app.state.chat, renderer)  # shares the chat service's admission
    app.state.tokenize = TokenizeService(app.state.chat)
    app.state.responses = ResponsesService(app.state.chat, ResponseStore(settings.responses_store_bytes),
                                           app.state.drain)
    install_error_handlers(app)
    app.openapi = _openapi_without_422(app)
    for router in (chat.router, completions.router, responses.router, tokenize.router, models.router,
                   adapters.router, ops.router):
        app.include_router(router)
    public = list(settings.public_paths)
    if settings.playground:  # the page itself holds nothing secret; what it calls needs the user's key
        app.state.playground = Assets.load()
        app.include_router(playground.router)
        public += PLAYGROUND_PATHS
    app.add_middleware(ShedLoad, refusal=app.state.chat.shed)  # innermost: after authentication
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(Authenticate, ring=ring, public_paths=public)
    # Outermost: request ids, access logs and drain refusals apply to everything, 413s included.
    app.add_middleware(RequestLifecycle, drain=app.state.drain, retry_after_s=settings.retry_after_s)
    return app

"""What every generating endpoint shares: admission (backpressure), adapter resolution, the engine run with its
accounting (metrics and the one log line per request), and the SSE body around an engine stream.

An endpoint (chat completions, completions, responses) prepares its `Prepared` engine request, then either
`run`s it to its `Totals`, or `open`s it (the first output awaited, so engine-side refusals are still an HTTP
error) and hands `sse` a `StreamFormat` that turns deltas into its own events. A stream that fails later ends
with the format's error event; one whose client goes away aborts its engine request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from typing import Any, Protocol

import anyio

from service.adapters.registry import AdapterRegistry, Revision
from service.auth import OPEN, Tenant
from service.engine.base import Delta, Engine
from service.errors import (
    APIError,
    ClientGone,
    ContextLengthExceeded,
    ModelNotFound,
    Overloaded,
    RateLimited,
    error_body,
    internal_error_body,
)
from service.limits import FairShare, LimitExceeded, Quotas, Ticket, note_headers
from service.metrics import Metrics
from service.serving.sse import DONE, sse_json
from service.serving.totals import Prepared, Totals

logger = logging.getLogger("vlora.generation")

# Set by the generating routes to their request's `is_disconnected`: a request waiting in the fair-share queue
# whose client has gone is dropped before it reaches the engine.
CLIENT_GONE: ContextVar[Callable[[], Awaitable[bool]] | None] = ContextVar("vlora_client_gone", default=None)
DISCONNECT_POLL_S = 0.25


class StreamFormat(Protocol):
    def start(self) -> list[str]: ...

    def delta(self, delta: Delta) -> list[str]: ...

    def end(self, totals: Totals) -> list[str]: ...

    def error(self, body: dict) -> list[str]:
        """Events for an OpenAI error body (`{"error": {...}}`), the stream's last."""
        ...


class Generation:
    """One per app: every generating endpoint shares its admission count (one --max-pending-requests bound)."""

    def __init__(self, engine: Engine, registry: AdapterRegistry, metrics: Metrics, max_pending: int = 64,
                 retry_after_s: int = 5, quotas: Quotas | None = None, fair: FairShare | None = None,
                 cache_per_tenant: bool = True):
        self.engine = engine
        self.cache_per_tenant = cache_per_tenant  # salt the engine's prefix cache with the tenant's name
        self.registry = registry
        self.metrics = metrics
        self.max_pending = max_pending
        self.retry_after = str(retry_after_s)
        self.active = 0
        self.by_tenant: dict[str, int] = {}  # admitted requests per tenant
        self.weights: dict[str, float] = {}
        self.quotas = quotas or Quotas()
        self.fair = fair

    # admission ----------------------------------------------------------------------------------

    def _fair_cap(self, tenant: Tenant) -> float:
        """A tenant's share of --max-pending-requests among the tenants holding requests (weighted)."""
        weights = {**{t: self.weights[t] for t in self.by_tenant}, tenant.name: tenant.weight}
        return self.max_pending * tenant.weight / sum(weights.values())

    def _overloaded(self, tenant: Tenant) -> Overloaded | None:
        mine = self.by_tenant.get(tenant.name, 0)
        if self.active < self.max_pending or (self.fair is not None and mine < self._fair_cap(tenant)):
            return None
        self.metrics.rejected.labels("overloaded").inc()
        self.metrics.tenant_rejected(tenant.name, "overloaded")
        return Overloaded(f"the server has {self.active} requests running or waiting (limit "
                          f"{self.max_pending}); retry later", headers={"Retry-After": self.retry_after})

    def shed(self, tenant: Tenant) -> Overloaded | None:
        """The refusal `admit` would give a request of `tenant` for a full server, decided before its body is
        read (a flooding tenant's requests then cost no parsing; service.lifecycle.ShedLoad)."""
        return self._overloaded(tenant)

    def admit(self, tenant: Tenant = OPEN, model: str | None = None) -> Ticket:
        """Backpressure and limits: refuse (429) rather than queue without bound. With fair share on, a full
        server still admits a tenant under its share of the bound (the flooding tenant is refused instead)."""
        if (refusal := self._overloaded(tenant)) is not None:
            raise refusal
        mine = self.by_tenant.get(tenant.name, 0)
        try:
            ticket = self.quotas.admit(tenant.name, tenant.limits, model.partition("@")[0] if model else None)
        except LimitExceeded as exc:
            self.metrics.rejected.labels(exc.limit).inc()
            self.metrics.tenant_rejected(tenant.name, exc.limit)
            raise RateLimited.of(exc) from None
        note_headers(self.quotas.headers(ticket.tenant))
        self.active += 1
        self.by_tenant[tenant.name] = mine + 1
        self.weights[tenant.name] = tenant.weight
        self.metrics.running_requests.inc()
        return ticket

    def release(self, ticket: Ticket | None = None, tenant: str = OPEN.name, used: int = 0) -> None:
        self.active -= 1
        left = self.by_tenant.get(tenant, 1) - 1
        if left > 0:
            self.by_tenant[tenant] = left
        else:
            self.by_tenant.pop(tenant, None)
        if ticket is not None:
            self.quotas.settle(ticket, used)
        self.metrics.running_requests.dec()

    def reserve(self, prep: Prepared) -> None:
        """Reserve the request's tokens (prompt + what it may generate) against its tenant's and adapter's
        tokens_per_minute once its prompt is counted."""
        s = prep.request.sampling
        try:
            self.quotas.reserve(prep.ticket, prep.prompt_tokens + s.max_tokens * max(1, s.n))
        except LimitExceeded as exc:
            self.metrics.rejected.labels(exc.limit).inc()
            self.metrics.tenant_rejected(prep.tenant, exc.limit)
            raise RateLimited.of(exc) from None
        note_headers(self.quotas.headers(prep.ticket.tenant))

    async def dispatch(self, prep: Prepared) -> None:
        """Wait for an engine slot when fair share is on (weighted by the tenant's priority class)."""
        if self.fair is not None:
            waited = await self._acquire_while_connected(prep.tenant)
            prep.dispatched = True
            self.metrics.tenant_queue_wait(prep.tenant, waited)
        if prep.on_dispatched is not None:
            prep.on_dispatched()

    async def _acquire_while_connected(self, tenant: str) -> float:
        """The fair-share slot, unless the client goes away first (then ClientGone, and no slot is held)."""
        if self.fair.try_take(tenant, self.weights.get(tenant, 1.0)):  # a free slot: no waiting, no watching
            return 0.0
        gone = CLIENT_GONE.get()
        if gone is None:
            return await self.fair.wait(tenant)
        acquire = asyncio.ensure_future(self.fair.wait(tenant))
        try:
            while True:
                done, _ = await asyncio.wait({acquire}, timeout=DISCONNECT_POLL_S)
                if done:
                    return acquire.result()
                if await gone():
                    raise ClientGone("the client closed the connection while the request waited for the engine")
        finally:
            if not acquire.done():
                acquire.cancel()  # FairShare.wait passes on a slot it was handed as it was cancelled
                with contextlib.suppress(asyncio.CancelledError):
                    await acquire

    def undispatch(self, prep: Prepared) -> None:
        if self.fair is not None and prep.dispatched:
            prep.dispatched = False
            self.fair.release(prep.tenant)

    def label_for(self, model: str) -> str:
        """Metric label of a requested name that may not exist (bounded: unknown names share one)."""
        if model == self.registry.base_name:
            return "base"
        name = model.partition("@")[0]
        return self.metrics.labels(name) if self.registry.known(model) else "unknown"

    async def resolve(self, model: str, tenant: Tenant = OPEN) -> Revision | None:
        """The adapter revision serving `model` (None: the base), held until `finish` releases it."""
        if model == self.registry.base_name and not tenant.base:
            raise ModelNotFound.named(model)
        revision = await self.registry.resolve(model, tenant.may_use_adapter)
        self.registry.acquire(revision)
        return revision

    def adapter_label(self, revision: Revision | None) -> str:
        return self.metrics.labels(revision.name if revision is not None else None)

    def room_for(self, prompt_tokens: int, wanted: int | None, prompt_param: str, counted: str = "") -> int:
        """Tokens left for the completion; ContextLengthExceeded when the prompt (`counted` says what it
        includes) leaves none, or fewer than `wanted`."""
        room = self.engine.max_model_len - prompt_tokens
        if room < 1 or (wanted is not None and wanted > room):
            raise ContextLengthExceeded(
                f"this model's maximum context length is {self.engine.max_model_len} tokens; the prompt has "
                f"{prompt_tokens} tokens{counted} and {wanted or 1} were requested for the completion",
                param=prompt_param if room < 1 else "max_tokens")
        return room

    def cache_salt(self, tenant: Tenant, client: str | None) -> str | None:
        """The engine's prefix-cache salt of a request: its tenant's (--prefix-cache-per-tenant), narrowed by the
        client's own `cache_salt` (vLLM's) when it sent one. A tenant's name and the client's salt are kept apart
        (JSON), so that no tenant's salt, with or without a client's, equals another's."""
        if not self.cache_per_tenant:
            return client
        if client is None:
            return f"tenant:{tenant.name}"
        return "tenant+client:" + json.dumps([tenant.name, client])

    async def serve(self, model: str, prepare: Callable[[], Awaitable[Prepared]],
                    stream: Callable[[Prepared], StreamFormat] | None,
                    complete: Callable[[Prepared, Totals], Any], tenant: Tenant = OPEN):
        """A whole request of any endpoint: admission (limits, fair share), `prepare` (its refusals counted),
        then the SSE body in the `stream` format (which releases the admission slot when it ends), or
        `complete(prep, totals)`."""
        ticket = self.admit(tenant, model)
        handed_over, prep = False, None
        try:
            try:
                prep = await prepare()
                prep.ticket, prep.tenant = ticket, tenant.name
                prep.request.priority = tenant.engine_priority
                prep.request.cache_salt = self.cache_salt(tenant, prep.request.cache_salt)
                self.reserve(prep)
            except APIError as exc:
                if prep is not None:
                    self.registry.release(prep.revision)
                self.metrics.count_refusal(self.label_for(model), exc.status)
                raise
            if stream is not None:
                body = await self.open(prep, stream(prep))
                handed_over = True
                return body
            return complete(prep, await self.run(prep))
        finally:
            if not handed_over:
                self.release(ticket, tenant.name, prep.used if prep is not None else 0)

    # running ------------------------------------------------------------------------------------

    def finish(self, prep: Prepared, totals: Totals, status: str) -> None:
        self.registry.release(prep.revision)
        self.undispatch(prep)
        prep.used = totals.prompt_tokens + totals.completion_tokens
        self.metrics.tenant_request(prep.tenant, status, totals.prompt_tokens, totals.completion_tokens)
        reasons = sorted(set(totals.finish.values())) or ["none"]
        finish_reason = ",".join(reasons)
        ttft = (totals.first_token_at - prep.started) if totals.first_token_at else None
        e2e = time.perf_counter() - prep.started
        self.metrics.observe_request(
            adapter=prep.adapter_label, status=status, finish_reason=finish_reason,
            prompt_tokens=totals.prompt_tokens, image_tokens=prep.image_tokens, video_tokens=prep.video_tokens,
            completion_tokens=totals.completion_tokens, ttft=ttft, e2e=e2e,
        )
        itl = self.metrics.itl.labels(prep.adapter_label)
        for gap, tokens in totals.gaps:
            itl.observe(gap / tokens)
        logger.info(prep.kind, extra={
            "completion_id": prep.request.request_id, "model": prep.model, "adapter": prep.adapter_label,
            "status": status, "finish_reason": finish_reason, "prompt_tokens": totals.prompt_tokens,
            "image_tokens": prep.image_tokens, "video_tokens": prep.video_tokens,
            "completion_tokens": totals.completion_tokens,
            "ttft_ms": round(ttft * 1000, 1) if ttft is not None else None, "e2e_ms": round(e2e * 1000, 1)})

    async def run(self, prep: Prepared) -> Totals:
        """The whole output of a non-streamed request."""
        totals = Totals()
        status = "5xx"
        try:
            await self.dispatch(prep)
            async for delta in self.engine.generate(prep.request):
                totals.add(delta)
            status = "2xx"
        except APIError as exc:
            status = f"{exc.status // 100}xx"
            raise
        finally:
            self.finish(prep, totals, status)
        return totals

    async def open(self, prep: Prepared, fmt: StreamFormat) -> AsyncIterator[str]:
        """Start generation and wait for its first output, then return the SSE body iterator (which releases
        the admission slot when it ends). Errors before the first output propagate (a normal HTTP error)."""
        try:
            await self.dispatch(prep)
        except BaseException:
            self.finish(prep, Totals(), "aborted")
            raise
        stream = self.engine.generate(prep.request)
        try:
            first = await anext(stream, None)
        except BaseException as exc:
            self.finish(prep, Totals(), f"{exc.status // 100}xx" if isinstance(exc, APIError) else "5xx")
            await stream.aclose()
            raise
        return self._sse(prep, stream, first, fmt)

    async def _sse(self, prep: Prepared, stream: AsyncIterator[Delta], first: Delta | None,
                   fmt: StreamFormat) -> AsyncIterator[str]:
        rid, totals, status = prep.request.request_id, Totals(), "aborted"
        try:
            for event in fmt.start():
                yield event
            delta = first
            while delta is not None:
                totals.add(delta)
                for event in fmt.delta(delta):
                    yield event
                delta = await anext(stream, None)
            status = "2xx"
            for event in fmt.end(totals):
                yield event
        except APIError as exc:
            status = f"{exc.status // 100}xx"
            logger.warning("stream %s failed: %s", rid, exc.message)
            for event in fmt.error(error_body(exc.status, exc.message, exc.type, exc.param, exc.code)):
                yield event
        except Exception:  # a bug or an engine failure mid-stream: the client still gets an error event
            status = "5xx"
            logger.exception("stream %s failed", rid)
            for event in fmt.error(internal_error_body()):
                yield event
        finally:
            if status == "aborted":
                logger.info("stream %s ended early (client disconnected); aborting", rid)
            self.finish(prep, totals, status)
            self.release(prep.ticket, prep.tenant, prep.used)
            # Shielded: a disconnect cancels this task, and anyio re-delivers cancellation at every await.
            with anyio.CancelScope(shield=True):
                await stream.aclose()  # the engine backend aborts an unfinished request on close


def sse_error(body: dict) -> list[str]:
    """The chat/completions error ending: the error object, then `data: [DONE]`."""
    return [sse_json(body), DONE]

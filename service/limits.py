"""Tenant isolation: per-tenant and per-adapter limits, and fair share of the engine when it is saturated.

Limits (keys file, per tenant and per adapter; see service/auth.py): `max_concurrent` (requests running or
waiting), `requests_per_minute` and `tokens_per_minute` (prompt + completion, image tokens included), each a
token bucket that refills continuously and holds at most one minute's worth. A request takes one request at
admission; its tokens are reserved once its prompt is counted (prompt + the completion it may still produce,
capped at the bucket's size) and the unused part is given back when it ends, as OpenAI's limits behave.
Exceeding any limit is a 429 naming it, with `Retry-After` computed from the bucket; every answer carries
OpenAI's `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` headers for the tenant's minute limits.

Fair share (`FairShare`): the API process dispatches at most `slots` requests to the engine at once (its
running batch); when all are taken, waiting requests are dispatched by weighted fair share, the tenant with
the fewest dispatched requests per unit of weight first (weights from the priority class), so a flooding
tenant's backlog waits behind everyone else's next request instead of in front of it. vLLM has a priority
scheduler but no notion of tenants or shares, so the queue in front of it is ours; the priority class is
also passed to vLLM (`scheduling_policy: priority`), which orders what is already inside the engine.

Contended batch (`batch`, `--fair-share-batch`): a full batch of a flooding tenant's requests slows every
step the light tenant's requests share with it (on CPU above all), so slots alone cannot keep its latency.
With `batch` set, while more than one tenant is active the dispatched requests are held to `batch`, split by
weighted max-min fairness over each tenant's demand (its dispatched and waiting requests, or the most it had
in the last `idle_s`, so that a closed-loop client's next request finds its slot kept): a light tenant gets
all it asks for, the flooding one the rest. A tenant alone has every slot.

Written by hand: token buckets and a weighted fair queue over asyncio are a few dozen lines, and none of the
rate-limit libraries (limits, slowapi, aiolimiter) reserve and refund tokens or share a dispatch queue.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass

PRIORITIES = {"high": (0, 4.0), "normal": (1, 2.0), "low": (2, 1.0)}  # class -> (vLLM priority, share weight)
LIMIT_FIELDS = ("max_concurrent", "requests_per_minute", "tokens_per_minute")
# Headers for the answer of the request being served (the rate-limit ones): service.lifecycle sets a fresh
# dict per request and adds them to the response when it starts, streamed or not.
answer_headers: ContextVar[dict[str, str] | None] = ContextVar("answer_headers", default=None)


def note_headers(headers: dict[str, str]) -> None:
    holder = answer_headers.get()
    if holder is not None:
        holder.update(headers)


@dataclass(frozen=True)
class Limits:
    max_concurrent: int | None = None
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None

    def __bool__(self) -> bool:
        return any(getattr(self, f) for f in LIMIT_FIELDS)

    @classmethod
    def parse(cls, entry: dict, where: str) -> Limits:
        values = {}
        for name in LIMIT_FIELDS:
            value = entry.get(name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{where}: {name} must be a positive integer, not {value!r}")
            values[name] = value
        return cls(**values)


def priority_class(value, where: str) -> str:
    if value is None:
        return "normal"
    if value not in PRIORITIES:
        raise ValueError(f"{where}: priority must be one of {', '.join(PRIORITIES)}, not {value!r}")
    return value


class LimitExceeded(Exception):
    """Which limit refused a request, and when to retry."""

    def __init__(self, owner: str, limit: str, value: int, retry_after: float, headers: dict[str, str]):
        self.owner, self.limit, self.value, self.retry_after, self.headers = owner, limit, value, retry_after, headers
        super().__init__(f"{owner} is over its {limit} limit ({value}); retry after {math.ceil(retry_after)} s")


class TokenBucket:
    """Holds at most `per_minute`, refills at `per_minute` per 60 s; may go below zero by a settled overrun."""

    def __init__(self, per_minute: int, now: float):
        self.capacity = float(per_minute)
        self.level = float(per_minute)
        self.rate = per_minute / 60.0
        self.at = now

    def _refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.at) * self.rate)
        self.at = now

    def wait_for(self, n: float, now: float) -> float:
        """Seconds until `n` can be taken (0: now)."""
        self._refill(now)
        n = min(n, self.capacity)
        return 0.0 if self.level >= n else (n - self.level) / self.rate

    def take(self, n: float, now: float) -> None:
        self._refill(now)
        self.level -= n

    def remaining(self, now: float) -> float:
        self._refill(now)
        return self.level

    def reset_s(self, now: float) -> float:
        """Seconds until the bucket is full again (OpenAI's x-ratelimit-reset-*)."""
        self._refill(now)
        return max(0.0, (self.capacity - self.level) / self.rate)


@dataclass
class _Holder:
    """One tenant's or one adapter's limits and live state."""

    name: str
    limits: Limits
    in_flight: int = 0
    requests: TokenBucket | None = None
    tokens: TokenBucket | None = None


@dataclass
class Ticket:
    """One admitted request: the holders it counts against and the tokens it has reserved."""

    holders: list[_Holder]
    tenant: _Holder
    reserved: float = 0.0
    done: bool = False


def _duration(seconds: float) -> str:
    """OpenAI's reset format: '1s', '6m0s', '20ms'."""
    if seconds < 1:
        return f"{max(1, round(seconds * 1000))}ms"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"


class Quotas:
    """The limits of every tenant and adapter, and their buckets (one per app)."""

    def __init__(self, adapter_limits: dict[str, Limits] | None = None, clock: Callable[[], float] = time.monotonic):
        self.adapter_limits = dict(adapter_limits or {})
        self.clock = clock
        self._holders: dict[tuple[str, str], _Holder] = {}

    def _holder(self, kind: str, name: str, limits: Limits) -> _Holder:
        holder = self._holders.get((kind, name))
        if holder is None or holder.limits != limits:  # new, or its limits changed (keys file reloaded)
            now = self.clock()
            holder = _Holder(f"{kind} '{name}'", limits, holder.in_flight if holder else 0,
                             TokenBucket(limits.requests_per_minute, now) if limits.requests_per_minute else None,
                             TokenBucket(limits.tokens_per_minute, now) if limits.tokens_per_minute else None)
            self._holders[(kind, name)] = holder
        return holder

    def headers(self, holder: _Holder) -> dict[str, str]:
        now, out = self.clock(), {}
        for kind, bucket in (("requests", holder.requests), ("tokens", holder.tokens)):
            if bucket is not None:
                out[f"x-ratelimit-limit-{kind}"] = str(int(bucket.capacity))
                out[f"x-ratelimit-remaining-{kind}"] = str(max(0, math.floor(bucket.remaining(now))))
                out[f"x-ratelimit-reset-{kind}"] = _duration(bucket.reset_s(now))
        return out

    def admit(self, tenant: str, tenant_limits: Limits, adapter: str | None) -> Ticket:
        """Count a request against its tenant and adapter (LimitExceeded: which limit, retry when)."""
        me = self._holder("tenant", tenant, tenant_limits)
        holders = [me]
        if adapter is not None and self.adapter_limits.get(adapter):
            holders.append(self._holder("adapter", adapter, self.adapter_limits[adapter]))
        now = self.clock()
        for h in holders:
            if h.limits.max_concurrent and h.in_flight >= h.limits.max_concurrent:
                raise LimitExceeded(h.name, "max_concurrent", h.limits.max_concurrent, 1.0, self.headers(me))
            if h.requests is not None and (wait := h.requests.wait_for(1, now)) > 0:
                raise LimitExceeded(h.name, "requests_per_minute", h.limits.requests_per_minute, wait, self.headers(me))
        for h in holders:
            h.in_flight += 1
            if h.requests is not None:
                h.requests.take(1, now)
        return Ticket(holders, me)

    def reserve(self, ticket: Ticket, tokens: int) -> None:
        """Reserve the tokens a request may use once its prompt is counted (LimitExceeded: not now)."""
        now = self.clock()
        for h in ticket.holders:
            if h.tokens is not None and (wait := h.tokens.wait_for(tokens, now)) > 0:
                raise LimitExceeded(h.name, "tokens_per_minute", h.limits.tokens_per_minute, wait,
                                    self.headers(ticket.tenant))
        for h in ticket.holders:
            if h.tokens is not None:
                h.tokens.take(min(tokens, h.tokens.capacity), now)
        ticket.reserved = tokens

    def settle(self, ticket: Ticket, used: int) -> None:
        """The request ended having used `used` tokens: give back what it reserved and did not use."""
        if ticket.done:
            return
        ticket.done = True
        now = self.clock()
        for h in ticket.holders:
            h.in_flight -= 1
            if h.tokens is not None and ticket.reserved:
                h.tokens.take(used - min(ticket.reserved, h.tokens.capacity), now)


@dataclass(eq=False)
class _Waiter:
    seq: int
    tenant: str
    future: asyncio.Future


class FairShare:
    """At most `slots` requests dispatched to the engine; waiting ones go by weighted fair share."""

    def __init__(self, slots: int, idle_s: float = 2.0, clock: Callable[[], float] = time.monotonic,
                 batch: int = 0):
        self.slots = slots
        self.idle_s = idle_s
        self.clock = clock
        self.batch = min(batch, slots)  # 0: no contended bound
        self._peak: dict[str, tuple[int, float]] = {}  # tenant -> (most requests it had, when last reached)
        self.dispatched: dict[str, int] = {}
        self.total = 0
        self._waiting: list[_Waiter] = []
        self._weights: dict[str, float] = {}
        self._seen: dict[str, float] = {}  # tenant -> when it last asked for a slot
        self._seq = 0

    def _share(self, tenant: str) -> float:
        """The tenant's dispatched requests per unit of weight once it takes one more slot (so between two
        idle tenants the heavier goes first)."""
        return (self.dispatched.get(tenant, 0) + 1) / self._weights.get(tenant, 1.0)

    def _fair_slots(self, tenant: str, active: list[str]) -> float:
        return self.slots * self._weights.get(tenant, 1.0) / sum(self._weights.get(t, 1.0) for t in active)

    def _live(self) -> dict[str, list[_Waiter]]:
        """Each tenant's waiters still waiting, oldest first (a waiter whose client went away may stay listed
        until its task runs)."""
        live: dict[str, list[_Waiter]] = {}
        for w in self._waiting:
            if not w.future.done():
                live.setdefault(w.tenant, []).append(w)
        return live

    def _demand(self, tenant: str, asking: bool, now: float, live: dict[str, list[_Waiter]]) -> int:
        """Requests `tenant` has dispatched and waiting (plus the one asking), or the most it had in the last
        `idle_s` if that is more; records a new peak."""
        have = self.dispatched.get(tenant, 0) + asking + len(live.get(tenant, ()))
        peak, at = self._peak.get(tenant, (0, -math.inf))
        if have >= peak or now - at > self.idle_s:
            self._peak[tenant] = (have, now)
            return have
        return peak

    def _allotment(self, tenant: str, active: list[str], now: float, asking: bool,
                   live: dict[str, list[_Waiter]]) -> int:
        """`tenant`'s part of the contended batch: one slot at a time to the active tenant with the fewest per
        unit of weight that still wants more (the lighter demand first on a tie), `batch` slots in all."""
        demand = {t: self._demand(t, asking and t == tenant, now, live) for t in active}
        given = dict.fromkeys(active, 0)
        for _ in range(self.batch):
            wanting = [t for t in active if given[t] < demand[t]]
            if not wanting:
                break
            given[min(wanting, key=lambda t: ((given[t] + 1) / self._weights.get(t, 1.0), demand[t], t))] += 1
        return given[tenant]

    def _room_for(self, tenant: str, asking: bool, live: dict[str, list[_Waiter]]) -> bool:
        """A free slot that `tenant` may take: every other tenant active in the last `idle_s` and below its
        weighted share of the slots keeps one free slot in reserve, so that its next request starts at once
        instead of waiting for a flooding tenant's request to finish (work-conserving otherwise). With a
        contended batch and other tenants active, `tenant` may also hold no more than its allotment of it."""
        now = self.clock()
        # Active: asked within idle_s, or has requests dispatched or waiting (a request may wait longer than
        # idle_s behind long ones), and the asking tenant itself.
        active = [t for t, at in self._seen.items()
                  if now - at <= self.idle_s or self.dispatched.get(t) or t in live or t == tenant]
        if self.batch and len(active) > 1:
            return (self.total < self.slots
                    and self.dispatched.get(tenant, 0) < self._allotment(tenant, active, now, asking, live))
        reserve = sum(1 for t in active if t != tenant and self.dispatched.get(t, 0) < self._fair_slots(t, active))
        mine = self.dispatched.get(tenant, 0) < self._fair_slots(tenant, active)
        return self.total < self.slots - (0 if mine else reserve)

    def _take(self, tenant: str) -> None:
        self.dispatched[tenant] = self.dispatched.get(tenant, 0) + 1
        self.total += 1

    async def acquire(self, tenant: str, weight: float) -> float:
        """Wait for a dispatch slot; returns the seconds waited."""
        return 0.0 if self.try_take(tenant, weight) else await self.wait(tenant)

    def try_take(self, tenant: str, weight: float) -> bool:
        """Take a dispatch slot now if one is free for `tenant` and nobody waiting has a better claim."""
        self._weights[tenant] = weight
        self._seen[tenant] = self.clock()
        live = self._live()
        ahead_of = list(live)
        if self.batch:  # a tenant waiting at its allotment of a contended batch has no claim on this slot
            ahead_of = [t for t in ahead_of if self._room_for(t, asking=False, live=live)]
        ahead = min((self._share(t) for t in ahead_of), default=float("inf"))
        if self._room_for(tenant, asking=True, live=live) and self._share(tenant) < ahead:
            self._take(tenant)
            return True
        return False

    async def wait(self, tenant: str) -> float:
        """Queue for a slot (after `try_take` found none); returns the seconds waited."""
        started = time.perf_counter()
        self._seq += 1
        waiter = _Waiter(self._seq, tenant, asyncio.get_running_loop().create_future())
        self._waiting.append(waiter)
        if self.batch:
            self._dispatch()  # a waiter ahead may be at its allotment: the free slot may be this one's
        try:
            await waiter.future
        except BaseException:
            if waiter in self._waiting:
                self._waiting.remove(waiter)
            elif waiter.future.done() and not waiter.future.cancelled():
                self.release(tenant)  # it was handed a slot as it was cancelled: pass the slot on
            raise
        return time.perf_counter() - started

    def release(self, tenant: str) -> None:
        self.dispatched[tenant] -= 1
        if not self.dispatched[tenant]:
            del self.dispatched[tenant]
        self.total -= 1
        self._dispatch()

    def _dispatch(self) -> None:
        while self._waiting and self.total < self.slots:
            # A waiter cancelled (its client went away) may still be listed until its task runs: drop it.
            self._waiting = [w for w in self._waiting if not w.future.done()]
            live = self._live()
            # The tenant furthest below its share goes next (the one waiting longest on a tie), and of its
            # requests the oldest. Under a contended batch a tenant at its allotment is passed over for the next.
            best = None
            for tenant in sorted(live, key=lambda t: (self._share(t), live[t][0].seq)):
                if self._room_for(tenant, asking=False, live=live):
                    best = live[tenant][0]
                    break
                if not self.batch:
                    break
            if best is None:
                return  # the free slots are held for tenants below their share
            self._waiting.remove(best)
            self._take(best.tenant)
            best.future.set_result(None)

    def waiting(self, tenant: str | None = None) -> int:
        live = self._live()
        return sum(map(len, live.values())) if tenant is None else len(live.get(tenant, ()))

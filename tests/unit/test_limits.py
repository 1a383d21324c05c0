"""Tenant limits and fair share as functions (a fake clock; no server)."""

from __future__ import annotations

import asyncio
import json

import pytest

from service.auth import KeyRing
from service.limits import FairShare, LimitExceeded, Limits, Quotas, TokenBucket, _duration


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_token_bucket_refills_continuously_and_caps_at_a_minute():
    bucket = TokenBucket(60, now=0.0)
    bucket.take(60, 0.0)
    assert bucket.wait_for(1, 0.0) == pytest.approx(1.0)  # 1 per second
    assert bucket.wait_for(1, 1.0) == 0.0
    assert bucket.remaining(1000.0) == 60  # never above its minute
    assert bucket.wait_for(600, 1000.0) == 0.0  # more than it holds: capped at capacity


def test_requests_per_minute_refuses_with_the_time_to_wait():
    clock = Clock()
    quotas = Quotas(clock=clock)
    limits = Limits(requests_per_minute=2)
    for _ in range(2):
        quotas.settle(quotas.admit("a", limits, None), 0)
    with pytest.raises(LimitExceeded) as refused:
        quotas.admit("a", limits, None)
    assert refused.value.limit == "requests_per_minute" and refused.value.retry_after == pytest.approx(30.0)
    assert refused.value.headers["x-ratelimit-remaining-requests"] == "0"
    assert "tenant 'a' is over its requests_per_minute limit (2)" in str(refused.value)
    clock.t += 30
    quotas.admit("a", limits, None)
    quotas.admit("b", limits, None)  # another tenant has its own bucket


def test_max_concurrent_counts_requests_until_they_settle():
    quotas = Quotas(clock=Clock())
    limits = Limits(max_concurrent=1)
    first = quotas.admit("a", limits, None)
    with pytest.raises(LimitExceeded, match="max_concurrent"):
        quotas.admit("a", limits, None)
    quotas.settle(first, 0)
    quotas.settle(first, 0)  # settling twice does not free a second slot
    quotas.admit("a", limits, None)
    with pytest.raises(LimitExceeded):
        quotas.admit("a", limits, None)


def test_tokens_are_reserved_then_the_unused_part_given_back():
    clock = Clock()
    quotas = Quotas(clock=clock)
    limits = Limits(tokens_per_minute=1000)
    ticket = quotas.admit("a", limits, None)
    quotas.reserve(ticket, 800)  # prompt + max_tokens
    with pytest.raises(LimitExceeded) as refused:
        quotas.reserve(quotas.admit("a", limits, None), 300)
    assert refused.value.limit == "tokens_per_minute" and refused.value.retry_after == pytest.approx(6.0)
    quotas.settle(ticket, 150)  # it used 150 of its 800
    headers = quotas.headers(ticket.tenant)
    assert headers["x-ratelimit-limit-tokens"] == "1000" and headers["x-ratelimit-remaining-tokens"] == "850"
    assert headers["x-ratelimit-reset-tokens"] == "9s"
    quotas.reserve(quotas.admit("a", limits, None), 800)


def test_adapter_limits_apply_to_every_tenant():
    quotas = Quotas({"colors": Limits(max_concurrent=1)}, clock=Clock())
    quotas.admit("a", Limits(), "colors")
    with pytest.raises(LimitExceeded, match="adapter 'colors'"):
        quotas.admit("b", Limits(), "colors")
    quotas.admit("b", Limits(), "shapes")


def test_reset_duration_format_is_openais():
    assert (_duration(0.02), _duration(1.2), _duration(360)) == ("20ms", "2s", "6m0s")


def test_fair_share_dispatches_the_tenant_below_its_share_first():
    async def scenario():
        fair = FairShare(slots=2)
        order = []
        await fair.acquire("flood", 1.0)
        await fair.acquire("flood", 1.0)  # the engine's batch is full of the flooding tenant

        async def ask(tenant, weight):
            await fair.acquire(tenant, weight)
            order.append(tenant)

        tasks = [asyncio.create_task(ask("flood", 1.0)) for _ in range(3)]
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(ask("light", 1.0)))  # arrives after three queued flood requests
        await asyncio.sleep(0)
        assert fair.waiting() == 4 and fair.waiting("light") == 1
        fair.release("flood")
        await asyncio.sleep(0)
        assert order == ["light"]  # jumps the flooding tenant's backlog
        for _ in range(3):
            fair.release("flood")
            await asyncio.sleep(0)
        await asyncio.gather(*tasks)
        return order

    assert asyncio.run(scenario()) == ["light", "flood", "flood", "flood"]


def test_fair_share_weights_by_priority_and_survives_cancellation():
    async def scenario():
        fair = FairShare(slots=1)
        await fair.acquire("x", 1.0)
        low = asyncio.create_task(fair.acquire("low", 1.0))
        high = asyncio.create_task(fair.acquire("high", 4.0))
        gone = asyncio.create_task(fair.acquire("gone", 8.0))
        await asyncio.sleep(0)
        gone.cancel()
        await asyncio.sleep(0)
        fair.release("x")
        await asyncio.sleep(0)
        assert high.done() and not low.done()  # the heavier of two idle tenants first, though it came later
        fair.release("high")
        await asyncio.sleep(0)
        assert low.done() and fair.total == 1

    asyncio.run(scenario())


def test_keys_file_limits_priorities_and_their_errors(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({
        "tenants": [{"name": "a", "keys": ["sk-aaaaaaaa"], "max_concurrent": 4, "tokens_per_minute": 9000,
                     "priority": "high"},
                    {"name": "b", "keys": ["sk-bbbbbbbb"]}],
        "adapters": {"colors": {"requests_per_minute": 60}}}))
    ring = KeyRing.from_settings([], [], path)
    a = ring.authenticate("sk-aaaaaaaa")
    assert a.limits == Limits(max_concurrent=4, tokens_per_minute=9000) and (a.engine_priority, a.weight) == (0, 4.0)
    assert ring.authenticate("sk-bbbbbbbb").priority == "normal" and ring.prioritised
    assert ring.adapter_limits == {"colors": Limits(requests_per_minute=60)}
    for bad, message in [({"max_concurrent": 0}, "max_concurrent must be a positive integer"),
                         ({"priority": "urgent"}, "priority must be one of high, normal, low")]:
        path.write_text(json.dumps({"tenants": [{"name": "a", "keys": ["sk-aaaaaaaa"], **bad}]}))
        with pytest.raises(ValueError, match=message):
            KeyRing.from_settings([], [], path)


def test_fair_share_keeps_a_free_slot_for_an_active_tenant_below_its_share():
    async def scenario():
        clock = Clock()
        fair = FairShare(slots=4, idle_s=2.0, clock=clock)
        await fair.acquire("light", 1.0)  # light is active with one request in the engine
        for _ in range(2):
            await fair.acquire("flood", 1.0)
        blocked = asyncio.create_task(fair.acquire("flood", 1.0))  # flood at its share (2 of 4): the last
        await asyncio.sleep(0)                                         # free slot is light's
        assert not blocked.done() and fair.total == 3
        assert await fair.acquire("light", 1.0) == 0.0  # light's next request starts at once
        fair.release("light")
        fair.release("light")
        clock.t += 3  # light went idle: the slot is the flooding tenant's again (work-conserving)
        fair.release("flood")
        await asyncio.sleep(0)
        assert blocked.done()

    asyncio.run(scenario())


def test_fair_share_never_hands_a_slot_to_a_cancelled_waiter():
    async def scenario():
        fair = FairShare(slots=1)
        await fair.acquire("a", 1.0)
        gone = asyncio.create_task(fair.acquire("b", 1.0))
        kept = asyncio.create_task(fair.acquire("c", 1.0))
        await asyncio.sleep(0)
        gone.cancel()
        assert fair.waiting() == 1 and fair.waiting("b") == 0  # listed until its task runs, but not counted
        fair.release("a")  # runs before the cancelled task does: its waiter must be skipped, not served
        await asyncio.sleep(0)
        assert kept.done() and fair.total == 1 and fair.dispatched == {"c": 1}
        fair.release("c")
        assert fair.total == 0 and fair.waiting() == 0

    asyncio.run(scenario())


def test_fair_share_hands_the_slot_to_a_request_that_waited_longer_than_the_idle_window():
    """A request queued behind a long one for more than `idle_s` still counts its tenant as active: the slot
    freed when the long one finishes is handed to it (this used to divide by an empty active set)."""
    now = [0.0]

    async def scenario():
        fair = FairShare(slots=1, idle_s=2.0, clock=lambda: now[0])
        await fair.acquire("solo", 1.0)  # a long request holds the only slot
        queued = asyncio.create_task(fair.acquire("solo", 1.0))
        await asyncio.sleep(0)
        now[0] = 10.0  # the long request runs far past the idle window
        fair.release("solo")
        await asyncio.wait_for(queued, 1)
        return fair.dispatched, fair.total

    assert asyncio.run(scenario()) == ({"solo": 1}, 1)


def test_fair_share_contended_batch_gives_the_light_tenant_its_demand_and_the_flood_the_rest():
    async def scenario():
        clock = Clock()
        fair = FairShare(slots=16, idle_s=2.0, clock=clock, batch=3)
        for _ in range(2):  # light: a closed loop of two
            assert await fair.acquire("light", 1.0) == 0.0
        flood = [asyncio.create_task(fair.acquire("flood", 1.0)) for _ in range(6)]
        await asyncio.sleep(0)
        # Before its backlog is known the flood's demand ties with light's; what is dispatched is never taken
        # back, and as the flood's requests end the batch settles at light's two and one of the flood's.
        assert fair.dispatched["light"] == 2 and fair.dispatched["flood"] <= 2
        while fair.dispatched["flood"] > 1 or fair.waiting("flood") == 6 - fair.dispatched["flood"]:
            fair.release("flood")
            await asyncio.sleep(0)
        assert fair.dispatched == {"light": 2, "flood": 1}
        backlog = fair.waiting("flood")
        fair.release("light")  # between two of light's requests its slot is kept (its peak within idle_s)
        await asyncio.sleep(0)
        assert fair.dispatched == {"light": 1, "flood": 1}
        assert await fair.acquire("light", 1.0) == 0.0  # light's next request starts at once
        fair.release("flood")  # a flood request ends: the next one of its backlog takes its place
        await asyncio.sleep(0)
        assert fair.dispatched == {"light": 2, "flood": 1} and fair.waiting("flood") == backlog - 1
        fair.release("light")
        fair.release("light")
        await asyncio.sleep(0)
        assert fair.dispatched == {"flood": 1}  # light is still active: its slots stay free
        clock.t += 3  # light went idle: the flood is alone and has every slot
        fair.release("flood")
        await asyncio.sleep(0)
        assert fair.dispatched == {"flood": backlog - 1} and fair.waiting() == 0
        for task in flood:
            await task

    asyncio.run(scenario())


def test_fair_share_contended_batch_weights_by_priority():
    async def scenario():
        fair = FairShare(slots=16, batch=6, clock=Clock())
        for _ in range(8):  # high (weight 4) has the engine to itself: all its requests start
            assert await fair.acquire("high", 4.0) == 0.0
        low = [asyncio.create_task(fair.acquire("low", 1.0)) for _ in range(8)]
        await asyncio.sleep(0)
        assert fair.dispatched == {"high": 8, "low": 1}  # low's part of the batch of 6: one
        for _ in range(3):  # as high's requests end, their slots are not low's beyond its part
            fair.release("high")
            await asyncio.sleep(0)
        assert fair.dispatched == {"high": 5, "low": 1} and fair.waiting("low") == 7
        for task in low:
            task.cancel()

    asyncio.run(scenario())


def test_cache_salts_keep_tenants_and_their_clients_apart():
    """Per tenant, a client's cache_salt narrows its tenant's salt and never equals another tenant's (names and
    salts may hold the separator); with the cache shared, the client's salt is vLLM's own."""
    from types import SimpleNamespace

    from service.serving.generation import Generation

    def salt(tenant: str, client: str | None, per_tenant: bool = True) -> str | None:
        return Generation.cache_salt(SimpleNamespace(cache_per_tenant=per_tenant), SimpleNamespace(name=tenant), client)

    salts = [salt("a", None), salt("a", "x"), salt("a", "y"), salt("a:x", None), salt("a", "b:c"), salt("a:b", "c"),
             salt("tenant:a", None), salt("a", "tenant:a")]
    assert len(set(salts)) == len(salts) and salts[0] == "tenant:a"
    assert salt("a", "x", per_tenant=False) == "x" and salt("a", None, per_tenant=False) is None

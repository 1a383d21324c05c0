"""Tenant limits against a real server: 429s naming the limit with Retry-After, OpenAI's rate-limit headers on
every answer (streamed too), per-adapter limits, priorities reaching vLLM's priority scheduler, tenant metrics.
The flood/fair-share proof under load is bench/isolation.py."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from tests.e2e.server import start_server

KEYS = {"tight": "sk-tight-000001", "tokens": "sk-tokens-00001", "single": "sk-single-00001", "vip": "sk-vip-0000001"}
BODY = {"model": "tiny-qwen3-vl", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4,
        "temperature": 0}


@pytest.fixture(scope="module")
def server(demo_assets, tmp_path_factory):
    """One engine slot (--max-running-requests 1): every limit here refuses at admission, before the engine, and
    a second request in flight waits in vlora's fair-share queue (test_a_queued_request_...)."""
    keys = tmp_path_factory.mktemp("tenant-keys") / "keys.yaml"
    keys.write_text(json.dumps({
        "tenants": [
            {"name": "tight", "keys": [KEYS["tight"]], "adapters": ["*"], "base": True, "requests_per_minute": 3},
            {"name": "tokens", "keys": [KEYS["tokens"]], "adapters": ["*"], "base": True, "tokens_per_minute": 300},
            {"name": "single", "keys": [KEYS["single"]], "adapters": ["*"], "base": True, "max_concurrent": 1},
            {"name": "vip", "keys": [KEYS["vip"]], "adapters": ["*"], "base": True, "priority": "high"}],
        "adapters": {"demo-b": {"max_concurrent": 1}}}))
    srv = start_server(["--model", str(demo_assets["model"]), "--adapter-dir", str(demo_assets["adapter_dir"]),
                        "--api-keys-file", str(keys), "--max-running-requests", "1"],
                       tmp_path_factory.mktemp("tenant-server") / "server.log",
                       env={"VLORA_KEYS_RELOAD_INTERVAL_S": "0.5"})
    srv.keys_file = keys
    yield srv
    srv.stop()


def post(server, tenant, body=None, timeout: float = 60, **kw) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/chat/completions", json=body or BODY, timeout=timeout,
                      headers={"Authorization": f"Bearer {KEYS[tenant]}"}, **kw)


def assert_limit_error(r: httpx.Response, limit: str, kind: str) -> None:
    assert r.status_code == 429, r.text
    error = r.json()["error"]
    assert error["type"] == kind and error["code"] == "rate_limit_exceeded" and limit in error["message"]
    assert int(r.headers["retry-after"]) >= 1


def test_requests_per_minute_and_its_headers(server):
    answers = [post(server, "tight") for _ in range(3)]
    assert [r.status_code for r in answers] == [200] * 3
    assert [r.headers["x-ratelimit-limit-requests"] for r in answers] == ["3"] * 3
    assert [r.headers["x-ratelimit-remaining-requests"] for r in answers] == ["2", "1", "0"]
    assert answers[-1].headers["x-ratelimit-reset-requests"].endswith("s")
    refused = post(server, "tight")
    assert_limit_error(refused, "requests_per_minute", "requests")
    assert 15 <= int(refused.headers["retry-after"]) <= 20  # one request refills in 20 s
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert post(server, "vip").status_code == 200  # another tenant is unaffected


def test_tokens_per_minute_reserves_then_settles(server):
    first = post(server, "tokens", {**BODY, "max_tokens": 200})
    assert first.status_code == 200 and first.headers["x-ratelimit-limit-tokens"] == "300"
    used = first.json()["usage"]["total_tokens"]
    assert int(first.headers["x-ratelimit-remaining-tokens"]) <= 300 - used + 300 // 60 * 2  # only what it used
    refused = post(server, "tokens", {**BODY, "max_tokens": 290})
    assert_limit_error(refused, "tokens_per_minute", "tokens")


def test_max_concurrent_counts_streams_and_headers_reach_streams(server):
    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=60,
                                     headers={"Authorization": f"Bearer {KEYS['single']}"}) as http:
            body = {**BODY, "max_tokens": 64, "min_tokens": 64, "stream": True}
            async with http.stream("POST", "/v1/chat/completions", json=body) as stream:
                assert stream.status_code == 200 and stream.headers["content-type"].startswith("text/event-stream")
                second = await http.post("/v1/chat/completions", json=BODY)
                async for _ in stream.aiter_lines():
                    pass
            third = await http.post("/v1/chat/completions", json=BODY)
            return second, third

    second, third = asyncio.run(run())
    assert_limit_error(second, "max_concurrent", "requests")
    assert third.status_code == 200  # the slot is free once the stream ended


def test_adapter_limit_applies_across_tenants(server):
    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            body = {**BODY, "model": "demo-b", "max_tokens": 64, "min_tokens": 64, "stream": True}
            async with http.stream("POST", "/v1/chat/completions", json=body,
                                   headers={"Authorization": f"Bearer {KEYS['vip']}"}) as stream:
                other = await http.post("/v1/chat/completions", json={**BODY, "model": "demo-b"},
                                        headers={"Authorization": f"Bearer {KEYS['single']}"})
                async for _ in stream.aiter_lines():
                    pass
            return other

    other = asyncio.run(run())
    assert_limit_error(other, "adapter 'demo-b' is over its max_concurrent", "requests")


def test_priority_reaches_the_engine_and_tenants_are_in_the_metrics(server):
    r = post(server, "vip", {**BODY, "model": "demo-a"})
    assert r.status_code == 200 and r.json()["model"] == "demo-a"
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert 'vlora_tenant_rejections_total{limit="requests_per_minute",tenant="tight"}' in text
    assert 'vlora_tenant_requests_total{status="2xx",tenant="vip"}' in text
    assert 'vlora_tenant_tokens_total{kind="completion",tenant="vip"}' in text
    assert "vlora_tenant_queue_wait_seconds_bucket" in text and "vlora_fair_share_waiting " in text
    # Normal tenants' requests carry vLLM priority 1, which vLLM refuses unless its priority scheduling is on:
    # their 200s above show vlora turned it on (a tenant has a priority class).


def test_stored_responses_belong_to_their_tenant(server):
    def call(tenant, method, path, **kw) -> httpx.Response:
        return httpx.request(method, f"{server.url}/v1/responses{path}", timeout=60,
                             headers={"Authorization": f"Bearer {KEYS[tenant]}"}, **kw)

    made = call("vip", "POST", "", json={"model": "demo-a", "input": "hello", "max_output_tokens": 2})
    assert made.status_code == 200 and made.json()["store"] is True
    rid = made.json()["id"]
    assert call("vip", "GET", f"/{rid}").json()["id"] == rid
    for path, method in ((f"/{rid}", "GET"), (f"/{rid}/input_items", "GET"), (f"/{rid}", "DELETE")):
        other = call("single", method, path)  # the same 404 as for an id that does not exist
        assert other.status_code == 404 and other.json()["error"]["param"] == "response_id", other.text
    follow = call("single", "POST", "", json={"model": "demo-a", "input": "hi", "previous_response_id": rid,
                                              "max_output_tokens": 2})
    assert follow.status_code == 404 and follow.json()["error"]["param"] == "previous_response_id"
    assert call("vip", "GET", f"/{rid}").status_code == 200  # still the owner's
    assert call("vip", "DELETE", f"/{rid}").json() == {"id": rid, "object": "response", "deleted": True}


def test_a_queued_request_whose_client_left_never_reaches_the_engine(server):
    """With the server's one engine slot taken, a second request waits in vlora's queue, not in the engine; its
    client leaving takes it out of the queue, and the slot is not lost."""
    from concurrent.futures import ThreadPoolExecutor

    def engine_finished() -> float:
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("vllm:request_success_total"))

    before = engine_finished()
    long = {**BODY, "max_tokens": 3000, "min_tokens": 3000}  # holds the only slot for seconds
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(post, server, "vip", long)
        deadline = time.monotonic() + 30
        while "vlora_engine_requests_running 1.0" not in httpx.get(f"{server.url}/metrics").text:
            assert time.monotonic() < deadline, "the first request never started"
            time.sleep(0.05)
        with pytest.raises(httpx.TimeoutException):  # queued behind it; this client gives up after 1 s
            post(server, "vip", timeout=1.0)
        assert first.result().status_code == 200
    time.sleep(1.0)
    assert engine_finished() - before == 1  # only the first request ran on the engine
    assert post(server, "vip").status_code == 200  # and its slot was not lost


LONG = "Describe these shapes in order: " + ", ".join(f"shape {i} is a {['red', 'blue'][i % 2]} circle" for i in range(60))


def test_the_prefix_cache_is_per_tenant(server):
    """A tenant's repeated prompt is served from the prefix cache (OpenAI's usage.prompt_tokens_details.cached_tokens,
    input_tokens_details on the Responses API); the same prompt from another tenant is not, so its time to first
    token says nothing about what others sent (test_adapters.py: shared with --no-prefix-cache-per-tenant)."""
    body = {**BODY, "messages": [{"role": "user", "content": LONG}], "max_tokens": 1}
    first, again = (post(server, "vip", body).json()["usage"] for _ in range(2))
    other = post(server, "single", body).json()["usage"]
    assert first["prompt_tokens"] > 200 and first["prompt_tokens_details"]["cached_tokens"] == 0
    assert again["prompt_tokens_details"]["cached_tokens"] >= first["prompt_tokens"] // 2
    assert other["prompt_tokens_details"]["cached_tokens"] == 0
    responses = [httpx.post(f"{server.url}/v1/responses", timeout=60, headers={"Authorization": f"Bearer {KEYS['vip']}"},
                            json={"model": BODY["model"], "input": LONG + " Once more.", "max_output_tokens": 1})
                 for _ in range(2)]
    cached = [r.json()["usage"]["input_tokens_details"]["cached_tokens"] for r in responses]
    assert cached[1] >= cached[0] > 0  # the chat's prefix, in whole blocks of the engine's KV cache


def test_a_clients_cache_salt_narrows_its_tenants_cache(server):
    """vLLM's cache_salt: within a tenant, requests with the same salt share cached prefixes and others do not
    (e.g. one salt per end user); the same salt from another tenant finds nothing (its tenant's salt comes
    first)."""
    body = {**BODY, "messages": [{"role": "user", "content": "Salted. " + LONG}], "max_tokens": 1}

    def cached(tenant: str, salt: str | None) -> int:
        sent = {**body, "cache_salt": salt} if salt else body
        return post(server, tenant, sent).json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    assert cached("vip", "user-1") == 0
    assert cached("vip", "user-1") > 0
    assert cached("vip", "user-2") == 0 and cached("vip", None) == 0 and cached("single", "user-1") == 0
    bad = post(server, "vip", {**body, "cache_salt": ""})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "cache_salt"


def test_keys_file_rotation_without_restart(server):
    """Last in this module (it rewrites the server's tenants file): new keys work and removed ones stop within
    the reload period; an unreadable new file keeps the keys in use and logs why."""
    import time

    data = json.loads(server.keys_file.read_text())
    data["tenants"] = [t for t in data["tenants"] if t["name"] != "vip"]
    data["tenants"].append({"name": "rotated", "keys": ["sk-rotated-0001"], "adapters": ["*"], "base": True})
    server.keys_file.write_text(json.dumps(data))

    def status(key):
        return httpx.post(f"{server.url}/v1/chat/completions", json=BODY, timeout=60,
                          headers={"Authorization": f"Bearer {key}"}).status_code

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and status("sk-rotated-0001") != 200:
        time.sleep(0.25)
    assert status("sk-rotated-0001") == 200 and status(KEYS["vip"]) == 401
    server.keys_file.write_text("{not json")
    time.sleep(1.5)  # three reload periods
    assert status("sk-rotated-0001") == 200  # the keys in use stay
    assert "tenants file not reloaded; keeping the keys in use" in server.log_tail(400)


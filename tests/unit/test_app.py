"""The app above the engine protocol, in process: the protocol fake is exactly the protocol, the settings
are the command line, and a stream whose engine fails mid-way ends as OpenAI clients expect.

A real engine cannot be made to fail on demand; the failure path is driven through the protocol's
stand-in (tests/fakes.py), with the official `openai` client on an in-process ASGI transport.
"""

from __future__ import annotations

import asyncio
import inspect

import httpx
import openai
import pytest

from service.app import create_app
from service.engine.base import Engine
from service.main import build_settings
from service.metrics import Metrics
from service.serving.render import ChatRenderer
from tests.fakes import FakeEngine


def _members(cls) -> set[str]:
    names = {n for n, _ in inspect.getmembers(cls) if not n.startswith("_")}
    return names | {n for n in getattr(cls, "__annotations__", {}) if not n.startswith("_")}


def test_fake_engine_is_the_protocol_and_nothing_else():
    protocol = _members(Engine)
    fake = _members(FakeEngine) - {"loaded", "log"}  # the fake's own record of what it was asked
    assert protocol == fake
    engine = FakeEngine()
    assert {"model_id", "max_model_len", "max_lora_rank"} <= set(vars(engine))


def test_the_command_line_is_generated_from_the_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("VLORA_PORT", "9000")
    monkeypatch.setenv("VLORA_MAX_NUM_SEQS", "3")
    s = build_settings(["--model", str(tmp_path), "--adapter", "a=/x", "--adapter", "b=/y", "--preload", "none",
                        "--enable-tower-lora", "--port", "8123", "--image-url-allowlist", "127.0.0.1/32",
                        "--log-format", "text", "--retry-after-s", "7"])
    assert s.port == 8123 and s.max_num_seqs == 3  # flags win over the environment, which still applies
    assert s.adapters == ["a=/x", "b=/y"] and s.preload == "none" and s.enable_tower_lora
    assert s.image_url_allowlist == ["127.0.0.1/32"] and s.log_format == "text" and s.retry_after_s == 7
    with pytest.raises(SystemExit, match="preload"):
        build_settings(["--preload", "sometimes"])
    with pytest.raises(SystemExit, match="NAME=PATH"):
        build_settings(["--adapter", "no-equals-sign"])


def _app(demo_assets, tiny_processor, engine: FakeEngine, metrics: Metrics, **settings):
    s = build_settings(["--model", str(demo_assets["model"]), *settings.get("argv", [])])
    return create_app(s, engine, metrics=metrics, renderer=ChatRenderer(tiny_processor))


async def _with_client(app, body):
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
            client = openai.AsyncOpenAI(base_url="http://app/v1", api_key="unused", http_client=http, max_retries=0)
            return await body(http, client)


def test_a_stream_failing_mid_way_ends_with_an_error_event_and_done(demo_assets, tiny_processor):
    metrics = Metrics()
    engine = FakeEngine(events=metrics, reply=lambda r: ["one", " two", " three"], fail_after=1)
    app = _app(demo_assets, tiny_processor, engine, metrics)
    base = app.state.settings.base_name
    request = {"model": base, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stream": True}

    async def body(http, client):
        raw = await http.post("/v1/chat/completions", json=request)
        with pytest.raises(openai.APIError, match="internal server error"):
            stream = await client.chat.completions.create(model=base, messages=request["messages"], max_tokens=8,
                                                          stream=True)
            async for _ in stream:
                pass
        scrape = (await http.get("/metrics")).text
        return raw, scrape

    raw, scrape = asyncio.run(_with_client(app, body))
    assert raw.status_code == 200  # headers went out with the first token
    events = [line for line in raw.text.split("\n\n") if line]
    assert '"content":"one"' in events[1]
    assert events[-2] == ('data: {"error":{"message":"internal server error","type":"internal_error",'
                          '"param":null,"code":"internal_error"}}')
    assert events[-1] == "data: [DONE]"
    assert 'vlora_requests_total{adapter="base",finish_reason="none",status="5xx"} 2.0' in scrape
    assert 'status="aborted"' not in scrape


def test_ready_sends_the_configured_retry_after(demo_assets, tiny_processor):
    metrics = Metrics()
    app = _app(demo_assets, tiny_processor, FakeEngine(events=metrics), metrics, argv=["--retry-after-s", "7"])

    async def probe():  # the lifespan has not run: the engine is not started, so the app is not ready
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as http:
            return await http.get("/ready")

    response = asyncio.run(probe())
    assert response.status_code == 503 and response.headers["retry-after"] == "7"
    assert response.json()["error"]["code"] == "not_ready"


def test_engine_args_reach_vllm_and_vlora_settings_keep_precedence(demo_assets):
    from service.engine.vllm_engine import VLLMEngine

    def args(*flags):
        return VLLMEngine(build_settings(["--model", str(demo_assets["model"]), *flags]), {}).engine_args()

    made = args("--engine-arg", "kv_cache_dtype=auto", "--engine-arg", "max_logprobs=30",
                "--engine-arg", 'mm_processor_kwargs={"max_pixels": 50176}', "--max-model-len", "2048")
    assert made.kv_cache_dtype == "auto" and made.max_logprobs == 30 and made.max_model_len == 2048
    assert made.mm_processor_kwargs == {"max_pixels": 50176}
    assert made.structured_outputs_config["disable_any_whitespace"]  # compact JSON unless asked otherwise
    with pytest.raises(ValueError, match="set by vlora's own settings.*--max-model-len"):
        args("--engine-arg", "max_model_len=10")
    with pytest.raises(ValueError, match="unknown vLLM engine arg.*no_such_arg"):
        args("--engine-arg", "no_such_arg=1")
    thinking = args("--reasoning-parser", "qwen3")  # constrained output starts after the reasoning
    assert thinking.structured_outputs_config["reasoning_parser"] == "qwen3"
    assert "reasoning_parser" not in made.structured_outputs_config
    with pytest.raises(ValueError, match="unknown reasoning parser 'nope'.*qwen3"):
        args("--reasoning-parser", "nope")
    parallel = args("--tensor-parallel-size", "2", "--data-parallel-size", "3", "--distributed-executor-backend", "mp")
    assert (parallel.tensor_parallel_size, parallel.data_parallel_size, parallel.pipeline_parallel_size,
            parallel.distributed_executor_backend) == (2, 3, 1, "mp")
    with pytest.raises(ValueError, match="set by vlora's own settings.*--data-parallel-size"):
        args("--engine-arg", "data_parallel_size=2")
    with pytest.raises(ValueError, match="pipeline-parallel-size > 1 does not run on vLLM's CPU backend"):
        args("--pipeline-parallel-size", "2")  # this machine's vLLM is the CPU build
    with pytest.raises(SystemExit, match="max_num_seqs"):  # the same refusal before anything starts
        __import__("service.main").main.main(["--model", str(demo_assets["model"]), "--engine-arg", "max_num_seqs=2"])


def test_openapi_declares_streams_and_error_statuses(demo_assets, tiny_processor):
    metrics = Metrics()
    spec = _app(demo_assets, tiny_processor, FakeEngine(events=metrics), metrics).openapi()
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/responses"):
        answers = spec["paths"][path]["post"]["responses"]
        assert set(answers["200"]["content"]) == {"application/json", "text/event-stream"}, path
        for status in ("400", "401", "404", "413", "429", "500", "503"):
            schema = answers[status]["content"]["application/json"]["schema"]
            assert schema["$ref"].endswith("/ErrorResponse"), (path, status)
        assert "422" not in answers  # validation errors are answered 400, as OpenAI does


def test_playground_is_served_and_can_be_turned_off(demo_assets, tiny_processor):
    metrics = Metrics()
    on = _app(demo_assets, tiny_processor, FakeEngine(events=metrics), metrics)
    spec = on.openapi()
    assert set(spec["paths"]["/playground"]["get"]["responses"]["200"]["content"]) == {"text/html"}
    assert set(spec["paths"]["/playground/app.js"]["get"]["responses"]["200"]["content"]) == {"text/javascript"}

    async def body(http, client):
        page, script = await http.get("/playground"), await http.get("/playground/app.js")
        cards = (await http.get("/playground/api/adapters")).json()
        return page, script, cards

    page, script, cards = asyncio.run(_with_client(on, body))
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert script.headers["content-type"].startswith("text/javascript") and "textContent" in script.text
    assert cards["admin"] and cards["data"][0]["base"]
    metrics2 = Metrics()
    off = _app(demo_assets, tiny_processor, FakeEngine(events=metrics2), metrics2, argv=["--no-playground"])
    assert "/playground" not in off.openapi()["paths"]
    gone = asyncio.run(_with_client(off, lambda http, client: http.get("/playground")))
    assert gone.status_code == 404


def test_histogram_quantile_estimate():
    from service.metrics import _quantile

    buckets = [(0.1, 0.0), (0.2, 10.0), (0.5, 20.0), (float("inf"), 20.0)]
    assert _quantile(0.5, buckets) == pytest.approx(0.2)
    assert _quantile(0.75, buckets) == pytest.approx(0.35)
    assert _quantile(0.5, [(0.1, 0.0), (float("inf"), 0.0)]) is None


def test_cpu_workers_get_their_own_cores():
    """VLLM_CPU_OMP_THREADS_BIND for tensor/data-parallel CPU workers (vLLM's own binding needs a NUMA node per
    worker): contiguous shares of the allowed cores, ranks in vLLM's [DP, PP, TP] order."""
    from service.engine.vllm_engine import cpu_thread_binding

    assert cpu_thread_binding([0, 1], 2) == "0|1"
    assert cpu_thread_binding([0, 1, 2, 3, 4], 2) == "0,1,2|3,4"
    assert cpu_thread_binding(list(range(8)), 4) == "0,1|2,3|4,5|6,7"
    assert cpu_thread_binding([3], 2) == "3|3"  # fewer cores than workers: shared


def test_tcmalloc_goes_first_in_ld_preload_once(monkeypatch):
    """--cpu-allocator tcmalloc: the system's library (found by the loader's rules, as LD_PRELOAD finds it) before
    whatever is preloaded already, never twice; none on the system is a start-up error naming the package."""
    import ctypes.util

    from service.engine.vllm_engine import preload, tcmalloc_library

    assert preload("libtcmalloc_minimal.so.4", "") == "libtcmalloc_minimal.so.4"
    assert preload("libtcmalloc_minimal.so.4", "/t/libgomp.so") == "libtcmalloc_minimal.so.4:/t/libgomp.so"
    assert preload("libtcmalloc_minimal.so.4", "/o/libtcmalloc.so:/t/libgomp.so") == "/o/libtcmalloc.so:/t/libgomp.so"
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    with pytest.raises(ValueError, match="libtcmalloc-minimal4"):
        tcmalloc_library()
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: f"lib{name}.so.4" if name == "tcmalloc" else None)
    assert tcmalloc_library() == "libtcmalloc.so.4"


class _BadPromptFails(FakeEngine):
    """Streams the fake's reply, and fails after the first piece for the prompt "bad"."""

    async def generate(self, request):
        async for delta in super().generate(request):
            yield delta
            if request.prompt == "bad":
                raise RuntimeError("the fake engine failed mid-stream")


def test_a_batch_stream_ends_with_the_failing_prompts_error_and_frees_every_slot(demo_assets, tiny_processor):
    metrics = Metrics()
    engine = _BadPromptFails(events=metrics, reply=lambda r: ["a", "b", "c"])
    # two slots: a slot a failed batch kept would refuse the requests after it
    app = _app(demo_assets, tiny_processor, engine, metrics, argv=["--max-pending-requests", "2"])
    base = app.state.settings.base_name

    async def body(http, client):
        raw = await http.post("/v1/completions", json={"model": base, "prompt": ["good", "bad"], "stream": True,
                                                       "max_tokens": 8})
        after = [await client.completions.create(model=base, prompt=["good", "good"], max_tokens=8)
                 for _ in range(3)]
        return raw, after

    raw, after = asyncio.run(_with_client(app, body))
    events = [line for line in raw.text.split("\n\n") if line]
    assert '"error"' in events[-2] and "internal server error" in events[-2]
    assert events[-1] == "data: [DONE]" and sum(e == "data: [DONE]" for e in events) == 1
    assert len({e.split('"id":"')[1][:20] for e in events if '"id":"' in e}) == 1  # one completion id
    for r in after:
        assert [c.index for c in r.choices] == [0, 1] and [c.text for c in r.choices] == ["abc", "abc"]

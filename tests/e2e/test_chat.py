"""End to end: a real server process, the real vLLM engine on the tiny model, the official `openai` client."""

from __future__ import annotations

import asyncio
import http.server
import os
import threading
import time

import httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from tests.e2e.server import MAX_BODY_BYTES, MAX_IMAGE_BYTES, engine_environments
from tests.images import data_uri, encode, image_message, shape_image

BASE = "tiny-qwen3-vl"
ADAPTERS = ["demo-a", "demo-b"]
# Fixed-length greedy outputs: long enough to tell models apart, short enough for a 2-core CPU.
GREEDY = dict(temperature=0, max_tokens=12, extra_body={"min_tokens": 12})


class _ImageHandler(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []
    png = encode(shape_image("blue"))

    def do_GET(self):  # noqa: N802
        type(self).hits.append(self.path)
        if self.path == "/shape.png":
            body, ctype = self.png, "image/png"
        elif self.path == "/page.html":
            body, ctype = b"<html></html>", "text/html"
        else:
            self.send_response(404)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def server(demo_server):
    return demo_server  # its caps and allowlist: tests/e2e/conftest.py and server.py


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def red_uri() -> str:
    return data_uri(encode(shape_image("red")))


def _chat(client: OpenAI, model: str, url: str, **kw) -> str:
    r = client.chat.completions.create(model=model, messages=image_message(url), **{**GREEDY, **kw})
    return r.choices[0].message.content


def _stream(client: OpenAI, model: str, url: str, **kw) -> tuple[str, list]:
    chunks = list(client.chat.completions.create(model=model, messages=image_message(url), stream=True,
                                                 stream_options={"include_usage": True}, **{**GREEDY, **kw}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def _assert_still_serves(client: OpenAI, url: str) -> None:
    assert _chat(client, BASE, url, max_tokens=2, extra_body={"min_tokens": 2})


# -- models ---------------------------------------------------------------------------------------------

def test_models_lists_base_and_adapters(client):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {BASE, *ADAPTERS}
    for name in ADAPTERS:
        assert models[name].model_extra["parent"] == BASE
    assert models[BASE].model_extra["parent"] is None
    assert client.models.retrieve("demo-a").id == "demo-a"


# -- generation -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", [BASE, *ADAPTERS])
def test_stream_and_non_stream_agree(client, red_uri, model):
    full = client.chat.completions.create(model=model, messages=image_message(red_uri), **GREEDY)
    text, chunks = _stream(client, model, red_uri)
    assert text == full.choices[0].message.content
    assert full.model == model and chunks[0].model == model
    assert full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 12
    assert full.usage.total_tokens == full.usage.prompt_tokens + 12
    # One id throughout, role first, usage last, and the usage matches the non-streamed one.
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_adapters_change_outputs_reproducibly(client, red_uri):
    outputs = {m: _chat(client, m, red_uri) for m in [BASE, *ADAPTERS]}
    assert len(set(outputs.values())) == 3, outputs
    again = {m: _chat(client, m, red_uri) for m in [BASE, *ADAPTERS]}
    assert again == outputs


def test_concurrent_mixed_batch_equals_solo(client, server, red_uri):
    """Base and adapter requests in one engine batch each get exactly their solo output (token for token)."""
    blue_uri = data_uri(encode(shape_image("blue", shape="square")))
    cases = [(m, u) for m in [BASE, *ADAPTERS] for u in (red_uri, blue_uri)]
    kw = dict(temperature=0, max_tokens=24, extra_body={"min_tokens": 24})
    solo = {case: _chat(client, *case, **kw) for case in cases}

    async def run_mixed():
        aclient = AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        jobs = [case for case in cases for _ in range(2)]
        results = await asyncio.gather(*(aclient.chat.completions.create(
            model=m, messages=image_message(u), **kw) for m, u in jobs))
        await aclient.close()
        return [(job, r.choices[0].message.content) for job, r in zip(jobs, results, strict=True)]

    for job, text in asyncio.run(run_mixed()):
        assert text == solo[job], f"{job[0]} differs in a mixed batch"


def test_sampling_parameters(client, red_uri):
    messages = image_message(red_uri)
    a = client.chat.completions.create(model="demo-a", messages=messages, temperature=1.0, top_p=0.9, seed=7,
                                       max_tokens=10, extra_body={"top_k": 50, "min_p": 0.01})
    b = client.chat.completions.create(model="demo-a", messages=messages, temperature=1.0, top_p=0.9, seed=7,
                                       max_tokens=10, extra_body={"top_k": 50, "min_p": 0.01})
    assert a.choices[0].message.content == b.choices[0].message.content
    n = client.chat.completions.create(model=BASE, messages=messages, n=3, temperature=1.0, max_tokens=6, seed=1,
                                       presence_penalty=0.5, frequency_penalty=0.5)
    assert [c.index for c in n.choices] == [0, 1, 2]
    assert 3 <= n.usage.completion_tokens <= 18
    assert all(c.finish_reason in ("stop", "length") for c in n.choices)
    short = client.chat.completions.create(model=BASE, messages=messages, max_completion_tokens=3, temperature=0)
    assert short.usage.completion_tokens <= 3
    # A stop string taken from the greedy output ends the completion before it.
    text = _chat(client, "demo-b", red_uri)
    stop = text[4:6]
    stopped = client.chat.completions.create(model="demo-b", messages=messages, temperature=0, max_tokens=12,
                                             stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stop not in stopped.choices[0].message.content
    assert text.startswith(stopped.choices[0].message.content)


def test_multi_turn_with_system_and_two_images(client, red_uri):
    blue = data_uri(encode(shape_image("blue"), "JPEG"), "image/jpeg")
    messages = [
        {"role": "system", "content": "Answer with one word."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": red_uri}},
                                     {"type": "image_url", "image_url": {"url": blue}},
                                     {"type": "text", "text": "Which colors?"}]},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "And the second?"},
    ]
    r = client.chat.completions.create(model="demo-a", messages=messages, **GREEDY)
    assert r.usage.completion_tokens == 12
    assert r.usage.prompt_tokens > 2 * 16  # both images' tokens are in the prompt


@pytest.mark.parametrize("fmt,mime", [("JPEG", "image/jpeg"), ("WEBP", "image/webp"), ("GIF", "image/gif")])
def test_image_formats(client, fmt, mime):
    text = _chat(client, BASE, data_uri(encode(shape_image("green"), fmt), mime))
    assert isinstance(text, str)


def test_image_by_http_url(client, image_server, red_uri):
    _ImageHandler.hits.clear()
    via_url = _chat(client, "demo-a", f"{image_server}/shape.png")
    via_data = _chat(client, "demo-a", data_uri(_ImageHandler.png))
    assert via_url == via_data
    assert _ImageHandler.hits == ["/shape.png"]


# -- errors ---------------------------------------------------------------------------------------------

def _raw(server, body, **kw) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60, **kw)


def _assert_error(resp: httpx.Response, status: int, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code
    return err


def test_unknown_model_is_404(client, red_uri):
    with pytest.raises(openai.NotFoundError) as exc:
        _chat(client, "no-such-adapter", red_uri)
    assert exc.value.body["code"] == "model_not_found"
    _assert_still_serves(client, red_uri)


@pytest.mark.parametrize("body,param", [
    ({"model": BASE}, "messages"),
    ({"model": BASE, "messages": []}, "messages"),
    ({"model": BASE, "messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
    ({"model": BASE, "messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ({"model": BASE, "messages": [{"role": "user", "content": [{"type": "video", "video": "x"}]}]}, None),
    ({"model": BASE, "messages": [{"role": "user", "content": "hi"}], "temperature": 7}, "temperature"),
    ({"model": BASE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ({"model": BASE, "messages": [{"role": "user", "content": "hi"}], "n": "many"}, "n"),
    ({"model": BASE, "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, None),
    ({"model": BASE, "messages": [{"role": "assistant", "content": "hi"}]}, None),
])
def test_malformed_requests_are_400(server, client, red_uri, body, param):
    err = _assert_error(_raw(server, body), 400)
    if param is not None:
        assert err["param"] == param, err
    _assert_still_serves(client, red_uri)


def test_invalid_json_is_400(server, client, red_uri):
    resp = httpx.post(f"{server.url}/v1/chat/completions", content=b"{not json",
                      headers={"content-type": "application/json"}, timeout=30)
    _assert_error(resp, 400)
    _assert_still_serves(client, red_uri)


@pytest.mark.parametrize("url,status", [
    ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAAB", 400),   # truncated PNG
    ("data:image/png;base64,%%%notbase64%%%", 400),
    ("data:text/plain;base64,aGVsbG8=", 400),
    ("data:image/png;base64," + "A" * 100, 400),                        # decodes, but is no image
    ("ftp://127.0.0.1/x.png", 400),
])
def test_undecodable_images_are_400(server, client, red_uri, url, status):
    _assert_error(_raw(server, {"model": BASE, "messages": image_message(url)}), status)
    _assert_still_serves(client, red_uri)


def test_an_image_too_narrow_to_resize_is_400_naming_it(server, client, red_uri):
    """4000x10 pixels: Qwen's resize refuses an aspect ratio over 200 (a 500 before)."""
    resp = _raw(server, {"model": BASE, "messages": image_message(data_uri(encode(shape_image("red", (4000, 10)))))})
    _assert_error(resp, 400)
    assert resp.json()["error"]["param"] == "image_url" and "aspect ratio" in resp.json()["error"]["message"]
    _assert_still_serves(client, red_uri)


def test_truncated_jpeg_is_400(server, client, red_uri):
    jpeg = encode(shape_image("red", (512, 512)), "JPEG")
    _assert_error(_raw(server, {"model": BASE, "messages": image_message(data_uri(jpeg[: len(jpeg) // 2]))}), 400)
    _assert_still_serves(client, red_uri)


def test_image_url_refusals_make_no_request(server, client, image_server, red_uri):
    _ImageHandler.hits.clear()
    port = image_server.rsplit(":", 1)[1]
    for url in (f"http://127.0.0.2:{port}/shape.png",  # loopback but not allowlisted: refused before connecting
                f"{image_server}/page.html", f"{image_server}/missing.png"):
        _assert_error(_raw(server, {"model": BASE, "messages": image_message(url)}), 400)
    assert _ImageHandler.hits == ["/page.html", "/missing.png"]
    _assert_still_serves(client, red_uri)


def test_too_large_inputs_are_413(server, client, red_uri):
    # Pixels: a 2000x2000 PNG compresses to a few KB, but is over the pixel limit.
    big = encode(shape_image("white", (2000, 2000)))
    _assert_error(_raw(server, {"model": BASE, "messages": image_message(data_uri(big))}), 413, "payload_too_large")
    # Bytes: an image payload over the per-image byte limit (the body itself is under its limit).
    blob = data_uri(b"\x89PNG" + b"\0" * (MAX_IMAGE_BYTES + 10))
    _assert_error(_raw(server, {"model": BASE, "messages": image_message(blob)}), 413, "payload_too_large")
    # Body: over the request body limit.
    huge = {"model": BASE, "messages": [{"role": "user", "content": "x" * (MAX_BODY_BYTES + 1)}]}
    _assert_error(_raw(server, huge), 413, "payload_too_large")
    _assert_still_serves(client, red_uri)


def test_too_many_images_is_400(server, client, red_uri):
    content = [{"type": "image_url", "image_url": {"url": red_uri}}] * 3 + [{"type": "text", "text": "hi"}]
    err = _assert_error(_raw(server, {"model": BASE, "messages": [{"role": "user", "content": content}]}), 400)
    assert "limit" in err["message"]
    _assert_still_serves(client, red_uri)


def test_context_length_exceeded_is_400(server, client, red_uri):
    err = _assert_error(_raw(server, {"model": BASE, "messages": image_message(red_uri), "max_tokens": 100_000}),
                        400, "context_length_exceeded")
    assert "maximum context length" in err["message"]
    long_prompt = " ".join(["what color"] * 5000)
    _assert_error(_raw(server, {"model": BASE, "messages": [{"role": "user", "content": long_prompt}]}),
                  400, "context_length_exceeded")
    _assert_still_serves(client, red_uri)


def test_unknown_route_is_openai_shaped_404(server):
    _assert_error(httpx.get(f"{server.url}/v1/nothing", timeout=10), 404)


# -- disconnect -----------------------------------------------------------------------------------------

def _metric(server, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_client_disconnect_aborts_engine_request(server, red_uri):
    # 4000 tokens: seconds of work, so the disconnect after a few chunks comes long before the end.
    body = {"model": "demo-a", "messages": image_message(red_uri), "stream": True, "max_tokens": 4000,
            "ignore_eos": True, "temperature": 1.0}
    aborted = 'vlora_requests_total{adapter="demo-a",finish_reason="none",status="aborted"}'
    tokens = 'vlora_generation_tokens_total{adapter="demo-a"}'
    aborted_before, tokens_before = _metric(server, aborted), _metric(server, tokens)
    with httpx.Client(timeout=60) as http, http.stream("POST", f"{server.url}/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got), got
    # The stream was closed after a few chunks: the engine drops the request, the server counts it as
    # aborted, and fewer tokens than requested were generated.
    def settled() -> tuple:
        return (_metric(server, "vlora_engine_requests_unfinished"), _metric(server, "vlora_requests_running"),
                _metric(server, aborted) - aborted_before)

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and settled() != (0, 0, 1):
        time.sleep(0.2)
    assert settled() == (0, 0, 1), (settled(), server.log_tail(20))
    # Stopped before the end: disconnect detection takes from milliseconds to seconds on a busy 2-core box.
    assert _metric(server, tokens) - tokens_before < 4000


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="vLLM binds its worker to every core of a 1-CPU host")
def test_the_api_process_keeps_off_the_cores_the_engine_worker_is_bound_to(server):
    """--api-cpus auto (the default): vLLM binds its CPU model worker to cores of its own and leaves the rest to
    other processes; the API process, every thread of it, runs only on the rest, so it never stalls a step."""
    import psutil

    workers = [p for p in psutil.Process(server.proc.pid).children(recursive=True) if p.name().startswith("VLLM::Worker")]
    assert workers, "no model worker process under the server"
    bound = set().union(*(os.sched_getaffinity(w.pid) for w in workers))
    assert bound < os.sched_getaffinity(0), bound  # vLLM's own binding left a core for other processes
    threads = {int(t): os.sched_getaffinity(int(t)) for t in os.listdir(f"/proc/{server.proc.pid}/task")}
    assert len(threads) > 2 and all(cpus and not cpus & bound for cpus in threads.values()), (bound, threads)
    assert "API process on CPU(s)" in server.log_path.read_text(errors="replace")


def test_cpu_memory_bounds_are_off_by_default(server):
    """Without --cpu-memory-bounds the engine keeps oneDNN's and glibc's own defaults (the bounds cost throughput:
    bench/results/cpu-memory-bounds/); test_ops.py runs a server with them."""
    engine = engine_environments(server.proc.pid)
    assert len(engine) >= 2, engine.keys()  # the engine core and its model worker
    for env in engine.values():
        assert "ONEDNN_PRIMITIVE_CACHE_CAPACITY" not in env and "MALLOC_MMAP_THRESHOLD_" not in env


def test_documents_for_a_template_that_does_not_render_them_are_a_400(client):
    """vLLM's documents (retrieval) reach a chat template that renders them (tests/unit/test_render.py); the tiny
    model's template, like Qwen3-VL's, does not, and the request says so instead of answering without them."""
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="tiny-qwen3-vl", messages=[{"role": "user", "content": "Summarize."}],
                                       max_tokens=2, extra_body={"documents": [{"title": "a", "text": "b"}]})
    assert exc.value.body["param"] == "documents" and "does not render documents" in exc.value.body["message"]

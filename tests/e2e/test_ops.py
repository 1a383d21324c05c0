"""Operations end to end: request ids, JSON logs, metrics exposition, backpressure, drain, engine death."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import MODELS
from tests.e2e.server import engine_environments, start_server
from tests.images import data_uri, encode, image_message, shape_image

MAX_PENDING = 4


@pytest.fixture(scope="module")
def server(demo_assets, tmp_path_factory):
    """One server for the module, over a copy of the demo adapter root (a test removes and rewrites its files);
    the last test ends it with SIGTERM."""
    root = tmp_path_factory.mktemp("ops-root") / "adapters"
    shutil.copytree(demo_assets["adapter_dir"], root)
    srv = start_server(
        ["--model", str(demo_assets["model"]), "--adapter-dir", str(root),
         "--max-pending-requests", str(MAX_PENDING), "--drain-grace-s", "60", "--cpu-memory-bounds",
         "--cpu-allocator", "tcmalloc", "--engine-arg", f'mm_processor_kwargs={{"max_pixels": {ENGINE_MAX_PIXELS}}}'],
        tmp_path_factory.mktemp("ops") / "server.log",
        env={"VLORA_METRICS_MAX_ADAPTER_LABELS": "1", "VLORA_ADAPTER_CHECK_INTERVAL_S": "0.3"},
    )
    srv.root = root
    yield srv
    srv.stop()


ENGINE_MAX_PIXELS = 128 * 128  # the engine's own image budget (--engine-arg mm_processor_kwargs)


def test_the_engines_image_budget_is_the_one_counted(server, body, tiny_processor):
    """An image budget given to the engine (--engine-arg mm_processor_kwargs) is the one vlora counts with: the
    engine's expanded prompt, usage and /tokenize agree (a 256x256 image: 16 tokens, not the processor's 64), and
    a request may lower it but not raise it."""
    pad = tiny_processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")

    def pads(extra: dict) -> int:
        r = httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                       json={**body, "max_tokens": 1, "return_token_ids": True, **extra})
        assert r.status_code == 200, r.text
        answer = r.json()
        ids = answer["prompt_token_ids"]
        counted = httpx.post(f"{server.url}/tokenize", timeout=60, json={
            "model": body["model"], "messages": body["messages"], **extra}).json()
        assert answer["usage"]["prompt_tokens"] == len(ids) == counted["count"] and counted["tokens"] == ids
        return ids.count(pad)

    assert pads({}) == 16
    assert pads({"mm_processor_kwargs": {"max_pixels": 64 * 64}}) == 4
    over = httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                      json={**body, "mm_processor_kwargs": {"max_pixels": ENGINE_MAX_PIXELS + 1}})
    assert over.status_code == 400 and over.json()["error"]["param"] == "mm_processor_kwargs"
    assert "above this server's 16384" in over.json()["error"]["message"]
    # vLLM applies a flat budget to videos too: counted the same way
    from tests.videos import moving_circle_mp4, video_data_uri

    video = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": video_data_uri(moving_circle_mp4(
        frames=24, size=(320, 240)))}}, {"type": "text", "text": "What moves?"}]}]
    r = httpx.post(f"{server.url}/v1/chat/completions", timeout=120, json={
        "model": body["model"], "messages": video, "max_tokens": 1, "return_token_ids": True}).json()
    counted = httpx.post(f"{server.url}/tokenize", timeout=120, json={"model": body["model"], "messages": video}).json()
    assert r["usage"]["prompt_tokens"] == len(r["prompt_token_ids"]) == counted["count"], (r["usage"], counted["count"])


@pytest.fixture(scope="module")
def body() -> dict:
    return {"model": "demo-a", "messages": image_message(data_uri(encode(shape_image("red")))), "max_tokens": 4,
            "temperature": 0}


def _log_lines(server) -> list[dict]:
    out = []
    for line in server.log_path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def test_request_id_echoed_and_logged_as_json(server, body):
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers={"X-Request-ID": "trace-123"}, timeout=60)
    assert r.status_code == 200 and r.headers["x-request-id"] == "trace-123"
    generated = httpx.get(f"{server.url}/v1/models", timeout=10).headers["x-request-id"]
    assert len(generated) == 32
    bad = httpx.get(f"{server.url}/v1/models", headers={"X-Request-ID": "a b\tc"}, timeout=10).headers["x-request-id"]
    assert bad != "a b\tc"
    time.sleep(0.3)
    entries = [e for e in _log_lines(server) if e.get("request_id") == "trace-123"]
    chat = next(e for e in entries if e["message"] == "chat completion")
    assert chat["adapter"] == "demo-a" and chat["status"] == "2xx" and chat["completion_tokens"] == 4
    assert chat["prompt_tokens"] > chat["image_tokens"] > 0 and chat["ttft_ms"] > 0
    access = next(e for e in entries if e["message"] == "http request")
    assert access["status"] == 200 and access["path"] == "/v1/chat/completions"
    assert "Authorization" not in json.dumps(entries)


def test_metrics_exposition_is_valid_and_bounded(server, body):
    for model in ("demo-a", "demo-b", "tiny-qwen3-vl", "nope"):
        httpx.post(f"{server.url}/v1/chat/completions", json={**body, "model": model}, timeout=60)
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    ours = {n for n in names if n.startswith("vlora_")}
    # Beside vlora's series, vLLM's own (the model-server protocol; see test_model_server_protocol_series) and
    # the Python process collector of the registry vLLM uses; nothing else, and no name twice.
    assert ours and all(n.startswith(("vlora_", "vllm:", "process_", "python_")) for n in names), names - ours
    assert len([ln for ln in text.splitlines() if ln.startswith("# TYPE ")]) == len(
        {ln.split()[2] for ln in text.splitlines() if ln.startswith("# TYPE ")})
    # Only one adapter may be named (VLORA_METRICS_MAX_ADAPTER_LABELS=1): the second shares 'other'.
    assert 'vlora_requests_total{adapter="demo-a",finish_reason="length",status="2xx"}' in text
    assert 'vlora_requests_total{adapter="other",finish_reason="length",status="2xx"}' in text
    assert 'vlora_requests_total{adapter="base",finish_reason="length",status="2xx"}' in text
    assert 'vlora_requests_total{adapter="unknown",finish_reason="none",status="4xx"}' in text
    assert 'adapter="demo-b"' not in "\n".join(ln for ln in text.splitlines() if ln.startswith("vlora_"))
    # Queue waits come from the engine's stats, mapped to adapters by the engine's own request -> adapter map.
    for adapter in ("demo-a", "base"):
        count = next(line for line in text.splitlines()
                     if line.startswith(f'vlora_queue_wait_seconds_count{{adapter="{adapter}"}}'))
        assert float(count.split()[-1]) >= 1, count
    for series in ("vlora_time_to_first_token_seconds_bucket", "vlora_inter_token_latency_seconds_bucket",
                   "vlora_queue_wait_seconds_bucket", "vlora_image_tokens_total", "vlora_engine_requests_waiting",
                   "vlora_engine_kv_cache_usage_ratio", "vlora_adapter_loads_total", "vlora_adapter_load_seconds_bucket"):
        assert series in text, series
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (.ci/run installs Debian's prometheus package)")
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    # What promtool finds is vLLM's naming, passed through unchanged because the model-server protocol reads
    # it: the `vllm:` prefix (colons are meant for recording rules) and one histogram named `_total`. vlora's
    # own series pass every lint (checked alone below).
    vllm_naming = ("metric names should not contain ':'", 'non-counter metrics should not have "_total" suffix')
    findings = [ln for ln in (check.stdout + check.stderr).splitlines() if ln.strip()]
    unexpected = [ln for ln in findings if not (ln.startswith("vllm:") and ln.endswith(vllm_naming))]
    assert not unexpected, unexpected
    ours = "\n".join(ln for ln in text.splitlines() if "vllm:" not in ln) + "\n"
    check = subprocess.run([promtool, "check", "metrics"], input=ours, capture_output=True, text=True)
    assert check.returncode == 0 and not check.stdout.strip() and not check.stderr.strip(), check.stdout + check.stderr


def test_model_server_protocol_series(server, body):
    """What the Gateway API Inference Extension's endpoint picker reads (its model-server protocol: vLLM's
    names), scraped while streams for two adapters run: queue, running, KV-cache use, the LoRA info series with
    adapter names as clients send them, and which adapters are loaded (vlora's addition)."""
    import threading

    stream_body = {**body, "max_tokens": 1500, "min_tokens": 1500, "stream": True}
    statuses = {}

    def hold(model):
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={**stream_body, "model": model},
                          timeout=120) as r:
            statuses[model] = r.status_code
            for _ in r.iter_lines():
                pass

    threads = [threading.Thread(target=hold, args=(m,)) for m in ("demo-a", "demo-b")]
    for t in threads:
        t.start()
    deadline, text, info = time.monotonic() + 30, "", ""
    while time.monotonic() < deadline:
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
        # One series per label combination seen, its value the time it was last true: the newest is now (the
        # picker reads it the same way).
        series = [ln for ln in text.splitlines() if ln.startswith("vllm:lora_requests_info{")]
        info = max(series, key=lambda ln: float(ln.rsplit(" ", 1)[1]), default="")
        if "demo-a" in info and "demo-b" in info:
            break
        time.sleep(0.2)
    for t in threads:
        t.join(120)
    assert statuses == {"demo-a": 200, "demo-b": 200}, statuses
    types = {ln.split()[2]: ln.split()[3] for ln in text.splitlines() if ln.startswith("# TYPE ")}
    for name in ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
                 "vllm:lora_requests_info"):
        assert types.get(name) == "gauge", (name, types.get(name))
    labels = dict(kv.split("=", 1) for kv in info[info.index("{") + 1:info.index("}")].split('",') if "=" in kv)
    assert {"max_lora", "running_lora_adapters", "waiting_lora_adapters"} <= set(labels), info
    running = labels["running_lora_adapters"].strip('"').split(",")
    assert set(running) == {"demo-a", "demo-b"} and "@" not in info, info  # names, not revision keys
    loaded = next(ln for ln in text.splitlines() if ln.startswith("vlora_lora_loaded_info{"))
    # Bounded like every adapter label: this module's server names one adapter (METRICS_MAX_ADAPTER_LABELS=1).
    assert 'max_lora="4"' in loaded and 'loaded_lora_adapters="demo-a"' in loaded, loaded


def test_cpu_memory_bounds_and_allocator_reach_the_engine_processes(server):
    """--cpu-memory-bounds and --cpu-allocator tcmalloc reach vLLM's engine core and model worker, which it spawns
    after the flags are read: their oneDNN kernel cache and glibc mmap threshold are bounded from their start,
    and tcmalloc is loaded into them (preloaded first, vLLM's libgomp after it); the API process keeps glibc's."""
    engine = engine_environments(server.proc.pid)
    assert len(engine) >= 2, engine.keys()  # the engine core and its model worker
    for pid, env in engine.items():
        assert env.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY") == "16"
        assert env.get("MALLOC_MMAP_THRESHOLD_") == "131072"
        preloaded = env.get("LD_PRELOAD", "").split(":")
        assert preloaded[0].startswith("libtcmalloc") and any("libgomp" in p for p in preloaded), preloaded
        assert "libtcmalloc" in Path(f"/proc/{pid}/maps").read_text()
    assert "libtcmalloc" not in Path(f"/proc/{server.proc.pid}/maps").read_text()


def test_backpressure_gives_429_and_recovers(server, body):
    """MAX_PENDING long streams hold every slot (their client reads only the first line); the flood that
    follows gets 429 + Retry-After, never a queue; once the holders go away the server serves again."""
    url = f"{server.url}/v1/chat/completions"
    holders = []
    for _ in range(MAX_PENDING):
        client = httpx.Client(timeout=120)
        stream = client.stream("POST", url, json={**body, "max_tokens": 4000, "ignore_eos": True, "stream": True})
        response = stream.__enter__()
        assert response.status_code == 200
        lines = response.iter_lines()  # kept: a dropped line iterator closes the response (a disconnect)
        assert next(lines).startswith("data: ")
        holders.append((client, stream, lines))
    try:
        flood = [httpx.post(url, json=body, timeout=30) for _ in range(8)]
        assert [r.status_code for r in flood] == [429] * 8
        assert all(r.headers["retry-after"] == "5" and r.json()["error"]["code"] == "overloaded" for r in flood)
    finally:
        for client, stream, _ in holders:
            stream.__exit__(None, None, None)
            client.close()
    deadline = time.monotonic() + 30
    status = 0
    while time.monotonic() < deadline and status != 200:
        status = httpx.post(url, json=body, timeout=60).status_code
        time.sleep(0.2)
    assert status == 200
    assert 'vlora_requests_rejected_total{reason="overloaded"} 8.0' in httpx.get(f"{server.url}/metrics").text


def test_failed_golden_samples_keep_not_ready_then_engine_death_exits_nonzero(demo_assets, trained_colors, tmp_path):
    """One server: an adapter whose golden samples fail keeps /ready at 503 (liveness stays fine); then the
    engine is killed during three streams: each ends with an error event and [DONE], a request arriving before
    the exit gets a 503 with Retry-After, and the process exits non-zero; restarted, it serves again."""
    tampered = tmp_path / "tampered"
    shutil.copytree(MODELS / "adapters" / "colors", tampered)
    manifest = json.loads((tampered / "manifest.json").read_text())
    assert manifest["golden_samples"]
    manifest["golden_samples"][0]["expected"] = "not what this adapter says"
    (tampered / "manifest.json").write_text(json.dumps(manifest))
    args = ["--model", str(demo_assets["model"]), "--adapter", f"tampered={tampered}",
            "--adapter", f"colors={MODELS / 'adapters' / 'colors'}"]
    # The watchdog's period is the window in which requests still reach a process whose engine is dead.
    srv = start_server(args, tmp_path / "server.log", env={"VLORA_HEALTH_CHECK_INTERVAL_S": "4"}, wait_path="/health")
    try:
        assert httpx.get(f"{srv.url}/health", timeout=10).status_code == 200
        ready = httpx.get(f"{srv.url}/ready", timeout=10)
        assert ready.status_code == 503
        message = ready.json()["error"]["message"]
        assert "golden" in message and "tampered" in message and "colors" not in message
        cores = [p for p in psutil.Process(srv.proc.pid).children(recursive=True) if "EngineCore" in " ".join(
            p.cmdline()) or "EngineCore" in p.name()]
        assert cores, [p.cmdline() for p in psutil.Process(srv.proc.pid).children(recursive=True)]
        body = {"model": "colors", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2000,
                "min_tokens": 2000, "stream": True}
        streams = [httpx.Client(timeout=60) for _ in range(3)]
        opened = [c.stream("POST", f"{srv.url}/v1/chat/completions", json=body) for c in streams]
        responses = [o.__enter__() for o in opened]
        lines = [r.iter_lines() for r in responses]
        for it in lines:  # every stream is under way
            assert next(line for line in it if line.startswith("data: "))
        for core in cores:
            os.kill(core.pid, signal.SIGKILL)
        for it in lines:  # each stream in flight ends with an OpenAI-shaped error event, then [DONE]
            events = [line for line in it if line.startswith("data: ")]
            assert events[-1] == "data: [DONE]" and '"error"' in events[-2], events[-3:]
        for o, c in zip(opened, streams, strict=True):
            o.__exit__(None, None, None)
            c.close()
        late = httpx.post(f"{srv.url}/v1/chat/completions", timeout=30, json={**body, "stream": False, "max_tokens": 4,
                                                                            "min_tokens": 0})
        assert late.status_code == 503 and late.json()["error"]["code"] == "engine_restarting", late.text
        assert int(late.headers["retry-after"]) >= 1
        assert srv.proc.wait(60) != 0
        assert "engine is dead" in srv.log_tail(200)
    finally:
        srv.stop()
    again = start_server(args, tmp_path / "server-restarted.log", wait_path="/health")  # what a restart gives
    try:
        r = httpx.post(f"{again.url}/v1/chat/completions", timeout=60, json={
            "model": "colors", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 200
    finally:
        again.stop()


def test_adapter_files_removed_or_changed_while_serving(server, tmp_path):
    """An adapter folder deleted or rewritten under a running server: that adapter answers a clear 503, the
    others keep answering, /ready stays up and names it; restored (moved back, or rewritten with the same bytes),
    it serves again."""
    root = server.root

    def ask(model):
        return httpx.post(f"{server.url}/v1/chat/completions", timeout=60, json={
            "model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})

    def wait_for(model, status):
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and ask(model).status_code != status:
            time.sleep(0.2)
        return ask(model)

    assert ask("demo-a").status_code == 200 and ask("demo-b").status_code == 200
    shutil.move(root / "demo-a", tmp_path / "demo-a-aside")
    gone = wait_for("demo-a", 503)
    assert gone.status_code == 503 and gone.json()["error"]["code"] == "adapter_unavailable"
    assert "folder was removed" in gone.json()["error"]["message"]
    assert ask("demo-b").status_code == 200
    ready = httpx.get(f"{server.url}/ready", timeout=10)
    assert ready.status_code == 200 and "demo-a" in ready.json()["unavailable"]
    weights = root / "demo-b" / "adapter_model.safetensors"
    loaded = weights.read_bytes()
    weights.write_bytes(loaded[:100])  # truncated: corrupted
    changed = wait_for("demo-b", 503)
    assert "changed on disk" in changed.json()["error"]["message"]
    shutil.move(tmp_path / "demo-a-aside", root / "demo-a")  # the same files back
    assert wait_for("demo-a", 200).status_code == 200
    weights.write_bytes(loaded)  # rewritten (a new mtime) with the bytes the engine loaded: the same adapter
    assert wait_for("demo-b", 200).status_code == 200
    assert httpx.get(f"{server.url}/ready", timeout=10).json().get("unavailable", {}) == {}
    assert server.proc.poll() is None


def test_sigterm_drains_streams_then_exits_0(server, body):
    """Last in this module (it ends the server): streams in flight finish with [DONE], and a background response
    under way runs to its end (nobody waits on a connection for it); new requests get 503 + Retry-After; exit
    code 0."""
    # Long enough (about 20 s four at a time here, and the signal comes within a second or two of their first
    # chunks) that the streams are surely still running when SIGTERM and the late request come.
    stream_body = {**body, "max_tokens": 1500, "ignore_eos": True, "stream": True}
    results: dict[int, list[str]] = {}
    started = threading.Barrier(4)

    def one(i):
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=stream_body, timeout=120) as r:
            lines = r.iter_lines()
            results[i] = [next(lines)]
            started.wait(30)
            results[i].extend(lines)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    # A kept-alive client connection, opened before the signal, carries the late requests.
    late_client = httpx.Client(timeout=30)
    assert late_client.get(f"{server.url}/v1/models").status_code == 200
    job = late_client.post(f"{server.url}/v1/responses", json={
        "model": "demo-a", "input": "hi", "max_output_tokens": 1500, "min_tokens": 1500, "background": True}).json()
    assert job["status"] == "queued", job
    started.wait(60)
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    late = late_client.post(f"{server.url}/v1/chat/completions", json=body)
    assert late.status_code == 503 and late.headers["retry-after"] == "5"
    assert late.json()["error"]["code"] == "shutting_down"
    assert late_client.get(f"{server.url}/ready").status_code == 503
    late_client.close()
    for t in threads:
        t.join(120)
    for i in range(3):
        assert results[i][-2:] == ["data: [DONE]", ""], results[i][-4:]
    assert server.proc.wait(60) == 0
    done = [line for line in _log_lines(server) if line.get("completion_id") == job["id"]]
    assert [(line["status"], line["completion_tokens"]) for line in done] == [("2xx", 1500)], done

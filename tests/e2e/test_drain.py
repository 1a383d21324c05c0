"""Graceful drain on SIGTERM, against a server of its own (the test ends the process)."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest

from tests.e2e.server import start_server
from tests.images import data_uri, encode, image_message, shape_image


@pytest.fixture()
def server(demo_assets, tmp_path):
    srv = start_server(["--model", str(demo_assets["model"]), "--adapter-dir", str(demo_assets["adapter_dir"]),
                        "--drain-grace-s", "60"], tmp_path / "server.log")
    yield srv
    srv.stop()


@pytest.fixture()
def body() -> dict:
    return {"model": "demo-a", "messages": image_message(data_uri(encode(shape_image("red")))), "max_tokens": 4,
            "temperature": 0}


def test_sigterm_drains_streams_then_exits_0(server, body):
    """Runs last: streams in flight finish with [DONE]; new requests get 503 + Retry-After; exit code 0."""
    # Long enough (seconds) that the streams are surely still running when SIGTERM and the late request come.
    stream_body = {**body, "max_tokens": 3000, "ignore_eos": True, "stream": True}
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

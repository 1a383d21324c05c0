"""A real Prometheus server (Debian's package) scrapes a running service; per-adapter TTFT quantiles query."""

from __future__ import annotations

import math
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.e2e.server import free_port
from tests.images import data_uri, encode, image_message, shape_image

PROMETHEUS = shutil.which("prometheus")
RULES = Path(__file__).resolve().parents[2] / "deploy" / "monitoring" / "rules.yml"
pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="prometheus missing (.ci/run installs Debian's package)")


@pytest.fixture(scope="module")
def service(demo_server):
    return demo_server


@pytest.fixture(scope="module")
def prometheus(service, tmp_path_factory):
    root = tmp_path_factory.mktemp("prometheus")
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
              "rule_files": [str(RULES)],
              "scrape_configs": [{"job_name": "vlora", "static_configs": [{"targets": [f"127.0.0.1:{service.port}"]}]}]}
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(root / "prometheus.log", "wb")
    proc = subprocess.Popen([PROMETHEUS, f"--config.file={root / 'prometheus.yml'}", f"--storage.tsdb.path={root / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail((root / "prometheus.log").read_text()[-2000:])
    yield url
    proc.terminate()
    proc.wait(30)
    log.close()


def _query(url: str, promql: str) -> list[dict]:
    r = httpx.get(f"{url}/api/v1/query", params={"query": promql}, timeout=10).json()
    assert r["status"] == "success", r
    return r["data"]["result"]


def test_prometheus_scrapes_per_adapter_ttft(service, prometheus):
    # Prometheus applies new targets after a few seconds: wait for the first scrape before the traffic,
    # so that rate() sees it as an increase.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not _query(prometheus, 'up{job="vlora"} == 1'):
        time.sleep(0.5)
    time.sleep(1.5)
    body = {"messages": image_message(data_uri(encode(shape_image("red")))), "max_tokens": 4, "temperature": 0}
    end = time.monotonic() + 4  # traffic across several 1-second scrapes
    while time.monotonic() < end:
        for model in ("demo-a", "demo-b"):
            assert httpx.post(f"{service.url}/v1/chat/completions", json={**body, "model": model},
                              timeout=60).status_code == 200
    promql = ('histogram_quantile(0.9, sum by (le, adapter) '
              '(rate(vlora_time_to_first_token_seconds_bucket{job="vlora"}[1m])))')
    deadline = time.monotonic() + 30
    result: list[dict] = []
    while time.monotonic() < deadline:
        result = _query(prometheus, promql)
        finite = {r["metric"].get("adapter") for r in result if not math.isnan(float(r["value"][1]))}
        if finite >= {"demo-a", "demo-b"}:
            break
        time.sleep(1)
    by_adapter = {r["metric"]["adapter"]: float(r["value"][1]) for r in result}
    assert {"demo-a", "demo-b"} <= set(by_adapter), result
    assert all(0 < by_adapter[a] < 40 and not math.isnan(by_adapter[a]) for a in ("demo-a", "demo-b")), (result, _query(prometheus, "vlora_time_to_first_token_seconds_count"))
    # The shipped recording rules evaluate against the live series too.
    targets = httpx.get(f"{prometheus}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
    assert targets[0]["health"] == "up"
    deadline = time.monotonic() + 75  # the recording group evaluates every 30 s
    # A series needs two scrapes before rate() sees it; an evaluation can come between the first scrapes of
    # the two adapters' series, so wait for one that has both.
    recorded: set[str] = set()
    while time.monotonic() < deadline and not recorded >= {"demo-a", "demo-b"}:
        recorded = {r["metric"]["adapter"] for r in _query(prometheus, "adapter:vlora_requests:rate5m")}
        time.sleep(1)
    assert recorded >= {"demo-a", "demo-b"}

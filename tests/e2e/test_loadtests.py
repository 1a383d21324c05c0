"""A short real load run (well under 30 s) against the tiny server with two adapters."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def server(demo_server):
    return demo_server


def test_short_run_writes_every_output(server, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "loadtests", "run", "--url", server.url, "--mode", "open", "--rate", "6",
         "--max-requests", "24", "--duration", "20", "--adapters", "demo-a,demo-b", "--mix", "round_robin",
         "--slo", "ttft=5", "--slo", "tpot=1", "--out", str(out)],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 24 and all(r["status"] == 200 and r["error"] is None for r in records)
    assert all(r["ttft"] > 0 and r["output_tokens"] >= 16 and len(r["token_times"]) >= 1 for r in records)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["requests"] == 24 and summary["successful"] == 24
    assert {k: v["requests"] for k, v in summary["per_adapter"].items()} == {"demo-a": 12, "demo-b": 12}
    assert summary["goodput_requests_per_s"] > 0 and summary["ttft"]["p50"] > 0
    report = (out / "report.md").read_text()
    assert "`demo-a`" in report and "Goodput" in report
    for png in ("latency_cdf.png", "ttft_over_time.png", "per_adapter.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    compared = subprocess.run([sys.executable, "-m", "loadtests", "compare", str(out / "summary.json"),
                               str(out / "summary.json")], capture_output=True, text=True, timeout=30)
    assert compared.returncode == 0 and "ttft.p50" in compared.stdout and "1.000" in compared.stdout


def test_requests_carry_and_are_summarized_by_their_extras_name(server, tmp_path):
    scenario = tmp_path / "kinds.yaml"
    scenario.write_text("mode: closed\nconcurrency: 2\nmax_requests: 8\nduration_s: 30\nmax_tokens: [8, 8]\nseed: 1\n"
                        "extras:\n  - {name: plain, weight: 1, body: {}}\n"
                        "  - {name: logprobs, weight: 1, body: {logprobs: true, top_logprobs: 2}}\n")
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "loadtests", "run", "--url", server.url, "--scenario", str(scenario),
                           "--adapters", "demo-a", "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 8 and all(r["status"] == 200 for r in records)
    assert {r["extra"] for r in records} == {"plain", "logprobs"}  # seed 1 draws both
    summary = json.loads((out / "summary.json").read_text())
    by_kind = {kind: s["requests"] for kind, s in summary["per_extra"].items()}
    assert by_kind == {k: sum(r["extra"] == k for r in records) for k in ("logprobs", "plain")}
    assert "extra `plain`" in (out / "report.md").read_text()

"""CPU per request: vLLM's own OpenAI server vs vlora, the same traffic, each server's processes measured apart.

    .venv/bin/python bench/api_cpu.py [--rounds 3] [--requests 160] [--out bench/results/api-cpu]
                                      [--scenario loadtests/scenarios/closed-c8-features.yaml]

On this machine (127.0.0.1 only, bounded in time): per round, each server in turn (order alternating) is
started alone with the tiny model and 4 adapters (serving_bench's settings), warmed up with 32 requests, then
serves the scenario's closed loop while the CPU seconds (user + system, from /proc through psutil) of its API
process, its engine-core process, its model worker and the load client are read before and after. Where the
serving bench asks how fast, this asks how much work: on a machine with few cores the API process competes
with the engine for them, so CPU seconds per request is the cost of the request path itself. A server alone
per round (the serving bench keeps both up at once) means a fresh process each round: first-call costs are
paid in its warm-up. Prints the per-round rows, then a table of medians and ratios (vlora / vLLM).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serving_bench import demo_models, start, stop  # noqa: E402


def cpu_s(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


def one_round(kind: str, round_: int, model: Path, adapters: dict[str, Path], scenario: Path, requests: int,
              out: Path) -> dict:
    proc, url = start(kind, model, adapters, out)
    loadgen = [sys.executable, "-m", "loadtests", "run", "--url", url, "--scenario", str(scenario),
               "--adapters", ",".join(adapters)]
    try:
        subprocess.run([*loadgen, "--max-requests", "32", "--out", str(out / "rounds" / f"{kind}-warmup-{round_}")],
                       capture_output=True, timeout=600, check=True)
        api = psutil.Process(proc.pid)
        children = {child.pid: child for child in api.children(recursive=True)}
        before = {"api": cpu_s(api), **{pid: cpu_s(c) for pid, c in children.items()}}
        started = time.monotonic()
        run_dir = out / "rounds" / f"{kind}-{round_}"
        client = subprocess.Popen([*loadgen, "--max-requests", str(requests), "--out", str(run_dir)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        watched, client_cpu = psutil.Process(client.pid), 0.0
        while client.poll() is None:  # the client's CPU, read until it exits (a gone process reads no more)
            try:
                client_cpu = cpu_s(watched)
            except psutil.Error:
                pass
            time.sleep(0.2)
        wall = time.monotonic() - started
        row = {"kind": kind, "round": round_, "wall_s": wall, "api_cpu_s": cpu_s(api) - before["api"],
               "client_cpu_s": client_cpu}
        for pid, child in children.items():
            name = {"VLLM::EngineCore": "engine_core_cpu_s", "VLLM::Worker": "worker_cpu_s"}.get(child.name())
            if name and child.is_running():
                row[name] = row.get(name, 0.0) + cpu_s(child) - before[pid]
        summary = json.loads((run_dir / "summary.json").read_text())
        row.update(requests=summary["successful"], errors=summary["requests"] - summary["successful"],
                   output_tokens_per_s=summary["output_tokens_per_s"], ttft_p50_s=summary["ttft"]["p50"])
        row["api_ms_per_request"] = 1000 * row["api_cpu_s"] / max(1, row["requests"])
        return row
    finally:
        stop(proc)


FIGURES = ("api_ms_per_request", "api_cpu_s", "engine_core_cpu_s", "worker_cpu_s", "client_cpu_s", "wall_s",
           "output_tokens_per_s", "ttft_p50_s")


def table(rows: list[dict]) -> str:
    med = {kind: {f: statistics.median(r[f] for r in rows if r["kind"] == kind and f in r) for f in FIGURES}
           for kind in ("vllm", "vlora")}
    lines = [f"{'figure':<22}{'vLLM':>12}{'vlora':>12}{'vlora/vLLM':>12}"]
    for f in FIGURES:
        a, b = med["vllm"][f], med["vlora"][f]
        lines.append(f"{f:<22}{a:>12.3f}{b:>12.3f}{(b / a if a else float('nan')):>12.3f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=160)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "api-cpu")
    parser.add_argument("--scenario", type=Path, default=ROOT / "loadtests" / "scenarios" / "closed-c8-features.yaml")
    args = parser.parse_args()
    model, adapters = demo_models()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for round_ in range(args.rounds):
        for kind in ("vllm", "vlora") if round_ % 2 == 0 else ("vlora", "vllm"):
            rows.append(one_round(kind, round_, model, adapters, args.scenario, args.requests, args.out))
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()}), flush=True)
    report = (f"{args.scenario.name}, {args.requests} requests a round, {args.rounds} rounds (order alternating), "
              f"each server alone; medians (CPU in seconds over the round):\n" + table(rows))
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    (args.out / "comparison.txt").write_text(report + "\n")
    print(report)


if __name__ == "__main__":
    main()

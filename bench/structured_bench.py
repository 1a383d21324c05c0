"""Structured-output benchmark: JSON-schema constrained requests on vlora against vLLM's own server (same
tiny model, adapters, engine settings, structured-output backend and schema workload), and against
unconstrained requests on vlora.

    .venv/bin/python bench/structured_bench.py [--rounds 5] [--requests 96] [--out bench/results/structured]

Both servers run at once on 127.0.0.1; each round runs, in alternating order, the constrained workload
(`loadtests/scenarios/closed-c8-json.yaml`: closed loop c=8, images, 4 adapters, every answer constrained by an
enum/boolean schema) on each server and the unconstrained one (`closed-c8.yaml`) on vlora. The table compares
per-figure medians over rounds. Targets: vlora's constrained output tok/s >= 1.00x vLLM's server's;
vlora's constrained TPOT p50 <= 1.15x its unconstrained TPOT p50. Both servers use xgrammar with compact JSON
(vlora's default; `--structured-outputs-config` for vLLM's server, set by serving_bench.start).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serving_bench import demo_models, load_run, median_summary, start, stop  # noqa: E402
from loadtests.report import compare, compare_table  # noqa: E402

FIGURES = ("requests_per_s", "output_tokens_per_s", "ttft.p50", "ttft.p90", "tpot.p50", "tpot.p90", "e2e.p50",
           "error_rate")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=96, help="requests per workload, server and round")
    parser.add_argument("--warmup", type=int, default=16)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "structured")
    args = parser.parse_args()
    model, adapters = demo_models()
    names = list(adapters)
    args.out.mkdir(parents=True, exist_ok=True)
    rounds_dir = args.out / "rounds"  # every round's report (ignored by git; the last constrained one is kept)
    scenarios = ROOT / "loadtests" / "scenarios"
    json_workload, free_workload = scenarios / "closed-c8-json.yaml", scenarios / "closed-c8.yaml"
    runs = [("vllm", "json", json_workload), ("vlora", "json", json_workload), ("vlora", "free", free_workload)]
    results: dict[str, list[dict]] = {f"{k}-{w}": [] for k, w, _ in runs}
    started = time.monotonic()
    servers = {}
    try:
        servers["vllm"] = start("vllm", model, adapters, args.out)
        servers["vlora"] = start("vlora", model, adapters, args.out)
        for kind, workload, scenario in runs:  # warm-up: adapters loaded, grammars compiled once
            load_run(servers[kind][1], scenario, names, args.warmup, rounds_dir / f"{kind}-{workload}-warmup")
        for round_ in range(args.rounds):
            shift = round_ % len(runs)
            for kind, workload, scenario in runs[shift:] + runs[:shift]:
                key = f"{kind}-{workload}"
                summary = load_run(servers[kind][1], scenario, names, args.requests, rounds_dir / f"{key}-{round_}")
                results[key].append(summary)
                print(f"round {round_ + 1}/{args.rounds} {key}: {summary['output_tokens_per_s']:.0f} tok/s, "
                      f"TPOT p50 {summary['tpot']['p50'] * 1000:.1f} ms, errors {summary['error_rate']:.3f}",
                      flush=True)
    finally:
        for proc, _ in servers.values():
            stop(proc)
    med = {key: median_summary(rounds) for key, rounds in results.items()}
    versus_vllm = [r for r in compare(med["vllm-json"], med["vlora-json"]) if r[0] in FIGURES]
    versus_free = [r for r in compare(med["vlora-free"], med["vlora-json"]) if r[0] in FIGURES]
    tput = med["vlora-json"]["output_tokens_per_s"] / med["vllm-json"]["output_tokens_per_s"]
    tpot = med["vlora-json"]["tpot"]["p50"] / med["vlora-free"]["tpot"]["p50"]
    text = [f"JSON-schema constrained requests, closed loop c=8, images, 4 adapters; medians of {args.rounds} rounds "
            f"of {args.requests} requests (order rotating), after {args.warmup} warm-up",
            "", "constrained: A = vLLM's server, B = vlora", compare_table(versus_vllm),
            "", "vlora: A = unconstrained (closed-c8.yaml), B = constrained", compare_table(versus_free),
            "", f"targets: constrained output tok/s vlora / vLLM {tput:.3f} (>= 1.00: {'met' if tput >= 1.0 else 'NOT met'}); "
                f"constrained / unconstrained TPOT p50 on vlora {tpot:.3f} (<= 1.15: {'met' if tpot <= 1.15 else 'NOT met'}); "
                f"took {time.monotonic() - started:.0f} s"]
    report = "\n".join(text)
    (args.out / "comparison.txt").write_text(report + "\n")
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    last = args.out / "vlora-json-last-round"
    shutil.rmtree(last, ignore_errors=True)
    shutil.copytree(rounds_dir / f"vlora-json-{args.rounds - 1}", last)
    print(report)


if __name__ == "__main__":
    main()

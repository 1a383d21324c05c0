"""Structured-output benchmark: JSON-schema constrained requests on vlora against vLLM's own server (same
tiny model, adapters, engine settings, structured-output backend and schema workload), and against
unconstrained requests on vlora.

    .venv/bin/python bench/structured_bench.py [--rounds 5] [--requests 96] [--out bench/results/structured]

Both servers run at once on 127.0.0.1; each round runs, in alternating order, the constrained workload
(`loadtests/scenarios/closed-c8-json.yaml`: closed loop c=8, images, 4 adapters, every answer constrained by an
enum/boolean schema) on each server, and on vlora two unconstrained ones: the same prompts with answers as long
as the constrained ones (their mean in the warm-up, `ignore_eos`), and `closed-c8.yaml` (64-token answers). The
table compares per-figure medians over rounds. Targets: vlora's constrained output tok/s >= 1.00x vLLM's
server's; vlora's constrained TPOT p50 <= 1.15x its unconstrained TPOT p50 at the same answer length. Both servers use xgrammar with compact JSON
(vlora's default; `--structured-outputs-config` for vLLM's server, set by serving_bench.start).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serving_bench import demo_models, load_run, median_summary, start, stop  # noqa: E402
from loadtests.report import compare, compare_table  # noqa: E402

FIGURES = ("requests_per_s", "output_tokens_per_s", "ttft.p50", "ttft.p90", "tpot.p50", "tpot.p90", "e2e.p50",
           "error_rate")


def same_length_workload(constrained: Path, warmup: dict, path: Path) -> tuple[Path, int]:
    """The constrained workload without its schema, every answer as long as the constrained answers' mean
    (`ignore_eos`). TPOT depends on answer length under a closed loop (each finished request brings a new
    prefill into the batch), so the grammar's cost per token is read against answers of the same length."""
    scenario = yaml.safe_load(constrained.read_text())
    scenario.pop("response_format")
    tokens = max(2, round(warmup["output_tokens_per_s"] * warmup["wall_s"] / warmup["successful"]))
    scenario.update(max_tokens=[tokens, tokens], ignore_eos=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(scenario, sort_keys=False))
    return path, tokens


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
    started = time.monotonic()
    servers = {}
    try:
        servers["vllm"] = start("vllm", model, adapters, args.out)
        servers["vlora"] = start("vlora", model, adapters, args.out)
        for kind, workload, scenario in runs:  # warm-up: adapters loaded, grammars compiled once
            summary = load_run(servers[kind][1], scenario, names, args.warmup, rounds_dir / f"{kind}-{workload}-warmup")
            if (kind, workload) == ("vlora", "json"):
                length, tokens = same_length_workload(json_workload, summary, rounds_dir / "closed-c8-json-free.yaml")
        runs.append(("vlora", "free-same-length", length))
        results: dict[str, list[dict]] = {f"{k}-{w}": [] for k, w, _ in runs}
        load_run(servers["vlora"][1], length, names, args.warmup, rounds_dir / "vlora-free-same-length-warmup")
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
    versus_same = [r for r in compare(med["vlora-free-same-length"], med["vlora-json"]) if r[0] in FIGURES]
    versus_free = [r for r in compare(med["vlora-free"], med["vlora-json"]) if r[0] in FIGURES]
    tput = med["vlora-json"]["output_tokens_per_s"] / med["vllm-json"]["output_tokens_per_s"]
    tpot = med["vlora-json"]["tpot"]["p50"] / med["vlora-free-same-length"]["tpot"]["p50"]
    tpot_64 = med["vlora-json"]["tpot"]["p50"] / med["vlora-free"]["tpot"]["p50"]
    text = [f"JSON-schema constrained requests, closed loop c=8, images, 4 adapters; medians of {args.rounds} rounds "
            f"of {args.requests} requests (order rotating), after {args.warmup} warm-up",
            "", "constrained: A = vLLM's server, B = vlora", compare_table(versus_vllm),
            "", f"vlora: A = unconstrained, same prompts and length ({tokens} tokens, the constrained answers' mean), "
                "B = constrained", compare_table(versus_same),
            "", "vlora: A = unconstrained closed-c8.yaml (64 tokens: fewer prefills per token), B = constrained",
            compare_table(versus_free),
            "", f"targets: constrained output tok/s vlora / vLLM {tput:.3f} (>= 1.00: {'met' if tput >= 1.0 else 'NOT met'}); "
                f"constrained / unconstrained TPOT p50 on vlora at the same length {tpot:.3f} "
                f"(<= 1.15: {'met' if tpot <= 1.15 else 'NOT met'}; against 64-token answers {tpot_64:.3f}); "
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

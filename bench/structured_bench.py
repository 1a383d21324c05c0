"""Structured-output benchmark: JSON-schema constrained requests on vlora against vLLM's own server (same
tiny model, adapters, engine settings, structured-output backend and schema workload), and against
unconstrained requests on vlora.

    .venv/bin/python bench/structured_bench.py [--rounds 5] [--requests 96] [--out bench/results/structured]

Both servers run at once on 127.0.0.1; each round runs, in alternating order, the constrained workload
(`loadtests/scenarios/closed-c8-json.yaml`: closed loop c=8, images, 4 adapters, every answer constrained by an
enum/boolean schema) on each server, and on vlora three unconstrained ones: the same prompts with answers of the
constrained answers' lengths (drawn from the lengths the warm-up's constrained answers had, `ignore_eos`), the
same prompts with every answer their mean length, and `closed-c8.yaml` (64-token answers). vLLM's server runs
the same-lengths control too, so that the table also shows what the grammar costs vLLM's own server, and
whether vlora's constrained figures differ from vLLM's where its unconstrained ones do not. The table compares
per-figure medians over rounds. Targets: vlora's constrained output tok/s >= 1.00x vLLM's server's; vlora's
constrained TPOT p50 <= 1.15x its unconstrained TPOT p50 at the same answer lengths (see `length_controls` for
why the lengths and not only their mean). Both servers use xgrammar with compact JSON (vlora's default;
`--structured-outputs-config` for vLLM's server, set by serving_bench.start).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
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


def answer_lengths(run: Path) -> list[int]:
    """Output tokens of each successful request of a `vlora-load` run."""
    rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines() if line.strip()]
    return [r["output_tokens"] for r in rows if r["status"] == 200 and not r.get("error") and r["output_tokens"]]


def length_controls(constrained: Path, lengths: list[int], folder: Path) -> tuple[Path, Path, int]:
    """The constrained workload without its schema, answers of the constrained answers' lengths (`ignore_eos`):
    every answer as long as their mean, and answers drawn from their very lengths. TPOT depends on answer length
    under a closed loop (each finished request brings a new prefill into the batch), and on its spread: answers
    of one length keep the closed loop's requests in lockstep, so their prefills fall in the same steps and their
    decode steps carry none (lower TPOT, higher TTFT) where the constrained answers, 44 to 56 tokens long,
    spread theirs over every request's decode. The grammar's cost per token is read against the second."""
    scenario = yaml.safe_load(constrained.read_text())
    scenario.pop("response_format")
    mean = max(2, round(statistics.mean(lengths)))
    folder.mkdir(parents=True, exist_ok=True)
    fixed, matched = folder / "closed-c8-json-free.yaml", folder / "closed-c8-json-free-lengths.yaml"
    fixed.write_text(yaml.safe_dump({**scenario, "max_tokens": [mean, mean], "ignore_eos": True}, sort_keys=False))
    matched.write_text(yaml.safe_dump({**scenario, "max_tokens": [min(lengths), max(lengths)],
                                       "max_tokens_choices": sorted(lengths), "ignore_eos": True}, sort_keys=False))
    return fixed, matched, mean


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
        lengths: list[int] = []
        for kind, workload, scenario in runs:  # warm-up: adapters loaded, grammars compiled once
            load_run(servers[kind][1], scenario, names, args.warmup, rounds_dir / f"{kind}-{workload}-warmup")
            if workload == "json":  # both servers' greedy answers: the constrained answers' lengths
                lengths += answer_lengths(rounds_dir / f"{kind}-{workload}-warmup")
        fixed, matched, tokens = length_controls(json_workload, lengths, rounds_dir)
        runs += [("vlora", "free-same-length", fixed), ("vlora", "free-same-lengths", matched),
                 ("vllm", "free-same-lengths", matched)]
        results: dict[str, list[dict]] = {f"{k}-{w}": [] for k, w, _ in runs}
        for kind, workload, scenario in runs[-3:]:
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
    versus_lengths = [r for r in compare(med["vlora-free-same-lengths"], med["vlora-json"]) if r[0] in FIGURES]
    versus_same = [r for r in compare(med["vlora-free-same-length"], med["vlora-json"]) if r[0] in FIGURES]
    versus_free = [r for r in compare(med["vlora-free"], med["vlora-json"]) if r[0] in FIGURES]
    vllm_lengths = [r for r in compare(med["vllm-free-same-lengths"], med["vllm-json"]) if r[0] in FIGURES]
    free_versus_vllm = [r for r in compare(med["vllm-free-same-lengths"], med["vlora-free-same-lengths"]) if r[0] in FIGURES]
    vllm_tpot = med["vllm-json"]["tpot"]["p50"] / med["vllm-free-same-lengths"]["tpot"]["p50"]
    tput = med["vlora-json"]["output_tokens_per_s"] / med["vllm-json"]["output_tokens_per_s"]
    tpot = med["vlora-json"]["tpot"]["p50"] / med["vlora-free-same-lengths"]["tpot"]["p50"]
    tpot_mean = med["vlora-json"]["tpot"]["p50"] / med["vlora-free-same-length"]["tpot"]["p50"]
    tpot_64 = med["vlora-json"]["tpot"]["p50"] / med["vlora-free"]["tpot"]["p50"]
    text = [f"JSON-schema constrained requests, closed loop c=8, images, 4 adapters; medians of {args.rounds} rounds "
            f"of {args.requests} requests (order rotating), after {args.warmup} warm-up",
            "", "constrained: A = vLLM's server, B = vlora", compare_table(versus_vllm),
            "", f"vlora: A = unconstrained, same prompts and answer lengths (drawn from the {len(lengths)} constrained "
                f"warm-up answers' lengths, {min(lengths)}-{max(lengths)} tokens), B = constrained",
            compare_table(versus_lengths),
            "", f"vlora: A = unconstrained, same prompts, every answer the constrained answers' mean length ({tokens} "
                "tokens: the closed loop's requests in lockstep), B = constrained", compare_table(versus_same),
            "", "vlora: A = unconstrained closed-c8.yaml (64 tokens: fewer prefills per token), B = constrained",
            compare_table(versus_free),
            "", "vLLM's server: A = unconstrained at the same answer lengths, B = constrained (what the grammar costs "
                "vLLM's own server)", compare_table(vllm_lengths),
            "", "unconstrained at the same answer lengths: A = vLLM's server, B = vlora", compare_table(free_versus_vllm),
            "", f"targets: constrained output tok/s vlora / vLLM {tput:.3f} (>= 1.00: {'met' if tput >= 1.0 else 'NOT met'}); "
                f"constrained / unconstrained TPOT p50 on vlora at the same answer lengths {tpot:.3f} "
                f"(<= 1.15: {'met' if tpot <= 1.15 else 'NOT met'}; against the mean length alone {tpot_mean:.3f}, "
                f"against 64-token answers {tpot_64:.3f}; vLLM's server's own ratio {vllm_tpot:.3f}); "
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

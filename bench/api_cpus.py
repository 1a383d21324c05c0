"""What `--api-cpus auto` gives: one vlora server, its API process unbound and pinned off the engine worker's
cores in alternating rounds, same model, adapters and traffic.

    .venv/bin/python bench/api_cpus.py [--rounds 10] [--requests 96] [--out bench/results/api-cpus]
                                       [--scenario loadtests/scenarios/closed-c8-features.yaml]

On this machine (127.0.0.1 only, bounded in time): one `vlora-serve` (the tiny model, four adapters,
`bench/serving_bench.py`'s engine settings), warmed up, then measured in rounds with `vlora-load` (closed loop
c=8, images, the API features in the mix). Before each round every thread of the API process is re-pinned: to
every core (`--api-cpus all`, what a process that nobody pins gets) or to the cores no engine process is bound
to (`--api-cpus auto`, the default), in alternating order (a b, b a, ...). One server for both arms: the same
engine, adapters and caches, so the rounds differ only where the API process may run. Prints (and writes) the
per-figure medians, their ratio pinned / unbound, the same for requests sent one at a time (each round has
both), and each round's ratio last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serving_bench import demo_models, load_run, median_summary, start, stop  # noqa: E402
from loadtests.report import compare, compare_table  # noqa: E402
from service.cpus import api_cpus, engine_bound_cpus, format_cpus, pin_process  # noqa: E402

FIGURES = ("requests_per_s", "output_tokens_per_s", "ttft.p50", "ttft.p90", "tpot.p50", "itl.p50", "e2e.p50")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10, help="measured rounds (arm order alternates)")
    parser.add_argument("--requests", type=int, default=96, help="requests per arm and round")
    parser.add_argument("--single-requests", type=int, default=40,
                        help="requests one at a time per arm and round (no queueing), beside the c=8 rounds")
    parser.add_argument("--warmup", type=int, default=24)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "api-cpus")
    parser.add_argument("--scenario", type=Path, default=ROOT / "loadtests" / "scenarios" / "closed-c8-features.yaml")
    args = parser.parse_args()
    model, adapters = demo_models()
    names = list(adapters)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    proc, url = start("vlora", model, adapters, args.out)
    results: dict[str, list[dict]] = {"unbound": [], "pinned": []}
    single: dict[str, list[dict]] = {"unbound": [], "pinned": []}
    try:
        everywhere = os.sched_getaffinity(0)  # the server has pinned itself already: this process has not
        bound = engine_bound_cpus(proc.pid, everywhere)
        free = api_cpus("auto", everywhere, bound)
        if free is None:
            sys.exit(f"no core left beside the engine's ({format_cpus(bound) or 'none bound'}): nothing to compare")
        arms = {"unbound": everywhere, "pinned": free}
        load_run(url, args.scenario, names, args.warmup, args.out / "rounds" / "warmup")
        for round_ in range(args.rounds):
            for arm in (("unbound", "pinned") if round_ % 2 == 0 else ("pinned", "unbound")):
                pin_process(arms[arm], proc.pid)
                summary = load_run(url, args.scenario, names, args.requests, args.out / "rounds" / f"{arm}-{round_}")
                results[arm].append(summary)
                if args.single_requests:
                    single[arm].append(load_run(url, args.scenario, names, args.single_requests,
                                                args.out / "rounds" / f"{arm}-single-{round_}", "--concurrency", "1"))
                print(f"round {round_ + 1}/{args.rounds} {arm}: {summary['output_tokens_per_s']:.0f} tok/s, "
                      f"TTFT p50 {summary['ttft']['p50'] * 1000:.1f} ms", flush=True)
    finally:
        stop(proc)
    a, b = median_summary(results["unbound"]), median_summary(results["pinned"])
    per_round = [(p["output_tokens_per_s"] / u["output_tokens_per_s"], p["ttft"]["p50"] / u["ttft"]["p50"])
                 for u, p in zip(results["unbound"], results["pinned"], strict=True)]
    text = [f"{args.scenario.name}, closed loop, images, 4 adapters; one server, medians of {args.rounds} alternating "
            f"rounds of {args.requests} requests; engine workers bound to CPU(s) {format_cpus(bound)}",
            f"A = API process unbound (CPUs {format_cpus(everywhere)}), B = pinned to CPU(s) {format_cpus(free)} "
            "(--api-cpus auto):",
            compare_table([r for r in compare(a, b) if r[0] in FIGURES]),
            *(["", "one request at a time (no queueing), A = unbound, B = pinned:",
               compare_table([r for r in compare(median_summary(single["unbound"]), median_summary(single["pinned"]))
                              if r[0] in ("ttft.p50", "tpot.p50", "e2e.p50")])] if single["pinned"] else []),
            "", "per round (pinned / unbound): " + "; ".join(f"tok/s {t:.3f}, TTFT p50 {f:.3f}" for t, f in per_round),
            f"median of the per-round ratios: tok/s {statistics.median(t for t, _ in per_round):.3f}, "
            f"TTFT p50 {statistics.median(f for _, f in per_round):.3f}; took {time.monotonic() - started:.0f} s"]
    report = "\n".join(text)
    (args.out / "comparison.txt").write_text(report + "\n")
    (args.out / "results.json").write_text(json.dumps({"load": results, "single": single}, indent=2))
    print(report)


if __name__ == "__main__":
    main()

"""What the CPU backend's memory bounds cost: vlora with `--cpu-memory-bounds` against
`--no-cpu-memory-bounds` (the default), same model, adapters and traffic, in alternating rounds.

    .venv/bin/python bench/cpu_memory_bounds.py [--rounds 6] [--requests 300] [--out bench/results/cpu-memory-bounds]
                                                [--arm NAME=VAR=VALUE,VAR=VALUE ...]

On this machine (127.0.0.1 only, bounded in time): two `vlora-serve` processes with the tiny model and four
adapters (`bench/serving_bench.py`'s engine settings and vLLM's multimodal cache off, as in the soak), both up
at once (an idle one uses no CPU), warmed up, then measured in alternating rounds (a b, b a, ...) of the soak's
workload (`loadtests/scenarios/soak-c32.yaml`: closed loop c=32 over all adapters, mixed image sizes) cut to
`--requests` per round. After each round the engine processes' RSS of the server just measured is read, so
the table shows the memory the bounds save next to what they cost. Prints (and writes) a table of per-figure
medians over rounds, ratio bounded / unbounded, last. With `--arm` (repeatable) the servers are instead
`--no-cpu-memory-bounds` with the given environment each (no variable: the unbounded reference), rotated
through the rounds, and every arm is compared with the first: what each lever costs on its own.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.isolation import tree_rss  # noqa: E402
from bench.serving_bench import demo_models, load_run, median_summary, start, stop  # noqa: E402
from loadtests.report import compare, compare_table  # noqa: E402

# name -> (server flags, environment)
ARMS = {"unbounded": (("--no-cpu-memory-bounds",), {}), "bounded": (("--cpu-memory-bounds",), {})}
SCENARIO = ROOT / "loadtests" / "scenarios" / "soak-c32.yaml"
FIGURES = ("output_tokens_per_s", "requests_per_s", "ttft.p50", "ttft.p95", "tpot.p50", "e2e.p50")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6, help="measured rounds (server order alternates)")
    parser.add_argument("--requests", type=int, default=300, help="requests per server and round")
    parser.add_argument("--warmup", type=int, default=64, help="unrecorded requests per server first")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cpu-memory-bounds")
    parser.add_argument("--arm", action="append", default=[],
                        help="NAME=VAR=VALUE,VAR=VALUE: a --no-cpu-memory-bounds server with this environment "
                             "(NAME alone: none); the first is the reference")
    args = parser.parse_args()
    arms = ARMS
    if args.arm:
        arms = {}
        for spec in args.arm:
            name, _, env = spec.partition("=")
            arms[name] = (("--no-cpu-memory-bounds",), dict(kv.split("=", 1) for kv in env.split(",") if kv))
    arm_names = list(arms)
    model, adapters = demo_models()
    adapter_names = list(adapters)
    args.out.mkdir(parents=True, exist_ok=True)
    rounds_dir = args.out / "scratch"
    rounds_dir.mkdir(exist_ok=True)
    started = time.monotonic()
    servers = {}
    loads: dict[str, list[dict]] = {arm: [] for arm in arms}
    rss: dict[str, list[dict]] = {arm: [] for arm in arms}
    try:
        for arm, (flags, env) in arms.items():
            servers[arm] = start("vlora", model, adapters, rounds_dir, ("--engine-arg", "mm_processor_cache_gb=0", *flags),
                                 log_name=f"{arm}-server.log", env_extra=env)
        for arm, (_, url) in servers.items():
            load_run(url, SCENARIO, adapter_names, args.warmup, rounds_dir / f"{arm}-warmup")
        for round_ in range(args.rounds):
            shift = round_ % len(arm_names)  # each arm first in turn (two arms: a b, b a, ...)
            for arm in arm_names[shift:] + arm_names[:shift]:
                proc, url = servers[arm]
                loads[arm].append(load_run(url, SCENARIO, adapter_names, args.requests, rounds_dir / f"{arm}-{round_}"))
                rss[arm].append(tree_rss(proc.pid))
                print(f"round {round_ + 1}/{args.rounds} {arm}: {loads[arm][-1]['output_tokens_per_s']:.0f} tok/s, "
                      f"engine RSS {rss[arm][-1]['engine_mib']:.0f} MiB", flush=True)
    finally:
        for proc, _ in servers.values():
            stop(proc)
    ref = arm_names[0]
    text = [f"soak-c32 workload (closed loop c=32, 4 adapters, images 128-512 px), median of {args.rounds} rotated "
            f"rounds of {args.requests} requests after {args.warmup} warm-up; RSS in MiB after the first and last "
            f"rounds. Arms: " + "; ".join(f"{name} = {' '.join(flags)} {' '.join(f'{k}={v}' for k, v in env.items())}"
                                           .strip() for name, (flags, env) in arms.items())]
    for arm in arm_names[1:]:
        rows = [r for r in compare(median_summary(loads[ref]), median_summary(loads[arm])) if r[0] in FIGURES]
        for key in ("engine_mib", "api_mib"):
            for label, i in (("round 1", 0), (f"round {args.rounds}", -1)):
                a, b = rss[ref][i][key], rss[arm][i][key]
                rows.append((f"{key} after {label}", a, b, b / a))
        per_round = [y["output_tokens_per_s"] / x["output_tokens_per_s"]
                     for x, y in zip(loads[ref], loads[arm], strict=True)]
        text += ["", f"A = {ref}, B = {arm}:", compare_table(rows),
                 f"per round output tok/s ({arm} / {ref}): " + ", ".join(f"{r:.3f}" for r in per_round)]
    text.append(f"took {time.monotonic() - started:.0f} s")
    report = "\n".join(text)
    (args.out / "comparison.txt").write_text(report + "\n")
    (args.out / "results.json").write_text(json.dumps({"load": loads, "rss": rss}, indent=2))
    print(report)


if __name__ == "__main__":
    main()

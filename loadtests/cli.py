"""`vlora-load`: load tests against any OpenAI-compatible endpoint.

    vlora-load run --url http://127.0.0.1:8000 --scenario loadtests/scenarios/zipf-images.yaml --out runs/a
    vlora-load run --url http://127.0.0.1:8000 --mode open --rate 4 --max-requests 100 --adapters colors,shapes
    vlora-load compare runs/a/summary.json runs/b/summary.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import httpx

from loadtests.report import compare, compare_table, write_outputs
from loadtests.runner import run
from loadtests.scenario import Scenario, ScenarioError, plan
from loadtests.stats import parse_slo, summarize_all


def _server_models(url: str, api_key: str | None) -> list[str]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    data = httpx.get(f"{url}/v1/models", headers=headers, timeout=30, trust_env=False).json()["data"]
    return [m["id"] for m in data]


class Progress:
    """Progress on stderr: finished/planned, elapsed, errors, req/s, tok/s, recent TTFT p50.

    On a terminal it is a tqdm bar redrawn in place; anywhere else (a CI log, a file) it is one plain line
    every `every_s` seconds (default 10) and a last one at the end, never carriage returns."""

    def __init__(self, stream=sys.stderr, every_s: float | None = None):
        self.stream = stream
        self.terminal = bool(getattr(stream, "isatty", lambda: False)())
        self.every_s = every_s if every_s is not None else (0.25 if self.terminal else 10.0)
        self.started = time.monotonic()
        self.shown = 0.0
        self.bar = None

    def _stats(self, records: list, elapsed: float) -> str:
        errors = sum(1 for r in records if r.error)
        ttfts = sorted(r.ttft for r in records[-50:] if r.ttft is not None)
        ttft = f"{ttfts[len(ttfts) // 2] * 1000:.0f} ms" if ttfts else "-"
        tokens = sum(r.output_tokens or 0 for r in records)
        return f"err {errors} {len(records) / elapsed:5.2f} req/s {tokens / elapsed:7.1f} tok/s TTFT p50 {ttft}"

    def __call__(self, records: list, total: int) -> None:
        now = time.monotonic()
        elapsed = max(now - self.started, 1e-9)
        if self.terminal:
            from tqdm import tqdm

            if self.bar is None:
                self.bar = tqdm(total=total, file=self.stream, unit="req", mininterval=self.every_s, dynamic_ncols=True)
            self.bar.set_postfix_str(self._stats(records, elapsed), refresh=False)
            self.bar.update(len(records) - self.bar.n)
            return
        if now - self.shown < self.every_s and len(records) < total:
            return
        self.shown = now
        width = 24
        filled = int(width * len(records) / max(total, 1))
        print(f"[{'#' * filled}{'.' * (width - filled)}] {len(records)}/{total} {elapsed:5.1f}s "
              f"{self._stats(records, elapsed)}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def cmd_run(args) -> None:
    overrides = {"mode": args.mode, "rate": args.rate, "concurrency": args.concurrency,
                 "max_requests": args.max_requests, "duration_s": args.duration, "mix": args.mix,
                 "seed": args.seed, "adapters": args.adapters.split(",") if args.adapters else None}
    scenario = (Scenario.from_yaml(args.scenario, **overrides) if args.scenario
                else Scenario(**{k: v for k, v in overrides.items() if v is not None}))
    slo = parse_slo(args.slo)
    url = args.url.rstrip("/")
    adapters = scenario.adapters or [m for m in _server_models(url, args.api_key) if m not in scenario.cold_adapters]
    planned = plan(scenario, adapters)
    progress = Progress()
    try:
        records, wall = asyncio.run(run(url, scenario, planned, args.api_key, progress))
    except KeyboardInterrupt:  # a second Ctrl-C during cleanup
        sys.exit(130)
    finally:
        progress.close()
    summary = summarize_all(records, wall, slo)
    meta = {"url": url, "scenario": scenario.name, "mode": scenario.mode, "seed": scenario.seed,
            "adapters": adapters, "planned": len(planned)}
    files = write_outputs(Path(args.out), records, summary, meta)
    print(f"{summary['successful']}/{summary['requests']} ok, {summary['requests_per_s']:.2f} req/s, "
          f"{summary['output_tokens_per_s']:.1f} tok/s, TTFT p50 "
          f"{(summary['ttft']['p50'] or 0) * 1000:.1f} ms; wrote {', '.join(str(f) for f in files[:3])} and plots")


def cmd_compare(args) -> None:
    a, b = (json.loads(Path(p).read_text()) for p in (args.a, args.b))
    print(compare_table(compare(a, b)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlora-load", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run a scenario against a server")
    p.add_argument("--url", required=True, help="server base URL (without /v1)")
    p.add_argument("--api-key")
    p.add_argument("--scenario", type=Path, help="YAML scenario (flags override it)")
    p.add_argument("--mode", choices=["open", "closed"])
    p.add_argument("--rate", type=float, help="requests/s (open loop)")
    p.add_argument("--concurrency", type=int, help="workers (closed loop)")
    p.add_argument("--max-requests", type=int)
    p.add_argument("--duration", type=float, help="seconds")
    p.add_argument("--mix", choices=["zipf", "uniform", "round_robin", "weights"])
    p.add_argument("--adapters", help="comma-separated model names (default: the server's /v1/models)")
    p.add_argument("--seed", type=int)
    p.add_argument("--slo", action="append", metavar="KEY=SECONDS", help="ttft, tpot or e2e limit (repeatable)")
    p.add_argument("--out", default="loadtest-results", help="output directory")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("compare", help="ratio table B/A of two summary.json files")
    p.add_argument("a")
    p.add_argument("b")
    p.set_defaults(func=cmd_compare)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ScenarioError, ValueError, httpx.HTTPError) as exc:
        sys.exit(f"vlora-load {args.command}: {exc}")


if __name__ == "__main__":
    main()

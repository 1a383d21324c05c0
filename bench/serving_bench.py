"""Serving benchmark: vLLM's own OpenAI server vs vlora, same model, adapters, engine settings and traffic.

    .venv/bin/python bench/serving_bench.py [--rounds 7] [--requests 160] [--out bench/results/serving]
                                            [--scenario loadtests/scenarios/closed-c8-features.yaml] [--pinned-vllm]

On this machine (127.0.0.1 only, bounded in time):
  (a) `python -m vllm.entrypoints.openai.api_server` with the tiny model and 4 LoRA adapters,
  (b) `vlora-serve` with the same model, adapters and engine settings,
both started, warmed up, then measured in alternating rounds (a b, b a, a b, ...) with the same `vlora-load`
scenario (closed loop, concurrency 8, images, 4 adapters) and with vLLM's own benchmark client
(`vllm.benchmarks.serve`, random prompts, LoRA names spread uniformly). Prints (and writes) the ratio table
vlora / vLLM of the per-figure medians over rounds, and each round's ratios. Targets (issue #15): at c=8
output tokens/s >= 1.03x and TTFT p50 <= 0.95x; one request at a time TTFT p50 and TPOT p50 <= 1.00x.

One request at a time (`--single-requests` in every round, pooled over rounds) is also reported by request
kind (the scenario's extras), because the servers do not stream every kind alike: vLLM's server holds a
named tool call back and sends it in a few chunks at its end, so its first chunk comes late and the time from
first to last chunk over the call's tokens is no time per token. The TPOT target is therefore read over the
kinds whose streams carry their tokens as they are generated on both servers (a kind's median stream has at
least one chunk per two output tokens); the table prints every kind's chunks per token, TTFT, TPOT and E2E,
and the TPOT of all kinds together beside it.

`--pinned-vllm` adds (c) the control: vLLM's server again, its API process pinned by hand off the cores its
CPU worker is bound to, as vlora's `--api-cpus auto` places its own (rounds rotate over the three), so that the
table tells what vlora's placement gives from what its request path gives.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loadtests.report import compare, compare_table  # noqa: E402
from loadtests.stats import RequestRecord  # noqa: E402
from service.cpus import api_cpus, engine_bound_cpus, format_cpus, pin_process  # noqa: E402

CONTROL_FIGURES = ("requests_per_s", "output_tokens_per_s", "ttft.p50", "ttft.p90", "tpot.p50", "e2e.p50")
ENGINE = {"max-model-len": "4096", "max-num-seqs": "16", "max-loras": "4", "max-lora-rank": "16"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, path: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout}s")


def start(kind: str, model: Path, adapters: dict[str, Path], out: Path,
          extra: tuple[str, ...] = (), log_name: str | None = None,
          env_extra: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    if kind == "vllm":
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
               "--served-model-name", model.name, "--host", "127.0.0.1", "--port", str(port), "--enable-lora",
               "--lora-modules", *[f"{n}={p}" for n, p in adapters.items()]]
        cmd += [x for k, v in ENGINE.items() for x in (f"--{k}", v)]
        cmd += ["--limit-mm-per-prompt", json.dumps({"image": 4, "video": 0}), "--seed", "0"]
        # vlora's defaults, so that both serve the same outputs: compact constrained JSON, Qwen's tool format.
        cmd += ["--structured-outputs-config", json.dumps({"backend": "xgrammar", "disable_any_whitespace": True}),
                "--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
        ready = "/health"
    else:
        cmd = [sys.executable, "-m", "service", "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
               "--log-format", "text", "--log-level", "warning"]
        cmd += [x for n, p in adapters.items() for x in ("--adapter", f"{n}={p}")]
        cmd += [x for k, v in ENGINE.items() for x in (f"--{k}", v)]
        ready = "/ready"
    cmd += list(extra)
    log = open(out / (log_name or f"{kind}-server.log"), "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, ready, proc)
    except BaseException:
        stop(proc)
        raise
    return proc, url


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def pin_off_engine_cpus(pid: int) -> str:
    """Pin every thread of the server process `pid` off the cores its engine's workers are bound to."""
    everywhere = os.sched_getaffinity(0)
    cpus = api_cpus("auto", everywhere, engine_bound_cpus(pid, everywhere))
    if cpus is None:
        return "unchanged (no core left beside the engine's)"
    pin_process(cpus, pid)
    return format_cpus(cpus)


def vllm_bench_client(url: str, model: str, tokenizer: Path, adapters: list[str], n: int, out: Path) -> dict | None:
    """vLLM's own benchmark client (text-only random prompts; LoRA names chosen uniformly)."""
    code = (
        "import sys, json\n"
        "from vllm.benchmarks.serve import add_cli_args, main\n"
        "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
        "p = FlexibleArgumentParser(); add_cli_args(p)\n"
        "r = main(p.parse_args(sys.argv[1:]))\n"
        "print('RESULT ' + json.dumps({k: v for k, v in r.items() if isinstance(v, (int, float))}))\n"
    )
    args = ["--backend", "openai-chat", "--base-url", url, "--endpoint", "/v1/chat/completions", "--model", model,
            "--tokenizer", str(tokenizer), "--dataset-name", "random", "--random-input-len", "64", "--random-output-len", "64",
            "--num-prompts", str(n), "--max-concurrency", "8", "--lora-modules", *adapters, "--ignore-eos",
            "--seed", "0", "--disable-tqdm"]
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    (out / f"vllm-bench-{url.rsplit(':', 1)[1]}.log").write_text(proc.stdout + proc.stderr)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return None


def median_summary(summaries: list[dict]) -> dict:
    """Per-figure median over rounds (a summary of the same shape as one round's)."""
    import statistics

    def merge(values: list):
        if all(isinstance(v, dict) for v in values):
            keys = [k for k in values[0] if all(k in v for v in values)]
            return {k: merge([v[k] for v in values]) for k in keys}
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            return statistics.median(values)
        return values[0]

    return merge(summaries)


def pooled(runs: list[Path]) -> dict[str, list[RequestRecord]]:
    """Every successful request of these load runs, all together and by request kind."""
    records = [r for run in runs for line in (run / "results.jsonl").read_text().splitlines()
               if (r := RequestRecord(**json.loads(line))).ok]
    kinds = sorted({r.extra for r in records if r.extra})
    return {"all": records, **{k: [r for r in records if r.extra == k] for k in kinds}}


def figure(record: RequestRecord, name: str) -> float | None:
    """A request's TTFT, TPOT, E2E (loadtests' own figures), or chunks per output token."""
    if name == "chunks/token":
        return len(record.token_times) / record.output_tokens if record.output_tokens else None
    return getattr(record, name)


def p50(records: list[RequestRecord], name: str) -> float:
    import statistics

    values = [v for r in records if (v := figure(r, name)) is not None]
    return statistics.median(values) if values else float("nan")


def token_streamed_kinds(a: dict[str, list[RequestRecord]], b: dict[str, list[RequestRecord]]) -> list[str]:
    """The request kinds whose median stream carries at least one chunk per two output tokens on both servers."""
    return [k for k in a if k != "all" and k in b and min(p50(a[k], "chunks/token"), p50(b[k], "chunks/token")) >= 0.5]


def single_table(a: dict[str, list[RequestRecord]], b: dict[str, list[RequestRecord]]) -> str:
    """Medians of the pooled one-at-a-time requests, all and by kind: A, B and B/A."""
    rows = []
    for kind in ["all", *(k for k in a if k != "all" and k in b)]:
        for name in ("ttft", "tpot", "e2e", "chunks/token"):
            va, vb = p50(a[kind], name), p50(b[kind], name)
            rows.append((f"{kind} {name} p50 (n={len(a[kind])}/{len(b[kind])})" if name == "ttft" else
                         f"{kind} {name} p50", va, vb, vb / va if va else None))
    return compare_table(rows)


def load_run(url: str, scenario: Path, adapters: list[str], requests: int, out: Path, *extra: str) -> dict:
    subprocess.run([sys.executable, "-m", "loadtests", "run", "--url", url, "--scenario", str(scenario),
                    "--max-requests", str(requests), "--adapters", ",".join(adapters), "--out", str(out), *extra],
                   check=True, timeout=600, capture_output=True)
    return json.loads((out / "summary.json").read_text())


def demo_models() -> tuple[Path, dict[str, Path]]:
    """The tiny model and the four adapters both servers serve: the trained demo ones and two random ones."""
    from trainer.demo import ensure_demo_assets, ensure_random_adapters

    models = ROOT / "models"
    ensure_demo_assets(models)
    model = models / "tiny-qwen3-vl"
    return model, {"colors": models / "adapters" / "colors", "shapes": models / "adapters" / "shapes",
                   **ensure_random_adapters(models / "test-adapters", model)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=160, help="requests per server and round")
    parser.add_argument("--single-requests", type=int, default=40,
                        help="requests one at a time per server in every round (no queueing: the per-request cost "
                             "of each server's API path), pooled over the rounds")
    parser.add_argument("--rounds", type=int, default=7, help="measured rounds (server order alternates)")
    parser.add_argument("--warmup", type=int, default=24, help="unrecorded requests per server first")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serving")
    parser.add_argument("--pinned-vllm", action="store_true",
                        help="a third server, the control: vLLM's own server with its API process pinned off its "
                             "worker's cores by hand, as vlora's --api-cpus auto places its own (c=8 and one at a "
                             "time, vlora-load only)")
    parser.add_argument("--scenario", type=Path, default=ROOT / "loadtests" / "scenarios" / "closed-c8.yaml",
                        help="vlora-load workload (closed-c8-features.yaml: structured outputs, logprobs and "
                             "tool calls in the mix)")
    args = parser.parse_args()
    model, adapters = demo_models()
    names = list(adapters)
    args.out.mkdir(parents=True, exist_ok=True)
    scenario = args.scenario
    started = time.monotonic()
    # Every server is up at once (an idle one uses no CPU) so that rounds can alternate: drift over the run
    # (other load, caches, thermal) then hits all alike, and the first-served has no edge.
    kinds = ["vllm", "vlora"] + (["vllm-pinned"] if args.pinned_vllm else [])
    servers: dict[str, tuple[subprocess.Popen, str]] = {}
    loads: dict[str, list[dict]] = {k: [] for k in kinds}
    bench: dict[str, list[dict]] = {k: [] for k in kinds}
    try:
        for kind in kinds:
            servers[kind] = start(kind.removesuffix("-pinned"), model, adapters, args.out, log_name=f"{kind}-server.log")
            if kind == "vllm-pinned":  # the control: vlora's --api-cpus placement applied to vLLM's server by hand
                pinned = pin_off_engine_cpus(servers[kind][0].pid)
                print(f"vllm-pinned: API process on CPU(s) {pinned}", flush=True)
        for kind, (_, url) in servers.items():  # warm-up: every adapter loaded, first-call costs paid
            load_run(url, scenario, names, args.warmup, args.out / "rounds" / f"{kind}-warmup")
        for round_ in range(args.rounds):
            shift = round_ % len(kinds)  # rotating: each server in each place alike (two: a b, b a, ...)
            order = kinds[shift:] + kinds[:shift]
            for kind in order:
                url = servers[kind][1]
                loads[kind].append(load_run(url, scenario, names, args.requests, args.out / "rounds" / f"{kind}-load-{round_}"))
                if args.single_requests:
                    load_run(url, scenario, names, args.single_requests, args.out / "rounds" / f"{kind}-single-{round_}",
                             "--concurrency", "1")
                if kind != "vllm-pinned":
                    result = vllm_bench_client(url, model.name, model, names, args.requests, args.out)
                    if result:
                        bench[kind].append(result)
                print(f"round {round_ + 1}/{args.rounds} {kind}: "
                      f"{loads[kind][-1]['output_tokens_per_s']:.0f} tok/s, "
                      f"TTFT p50 {loads[kind][-1]['ttft']['p50'] * 1000:.1f} ms", flush=True)
    finally:
        for proc, _ in servers.values():
            stop(proc)
    load_a, load_b = median_summary(loads["vllm"]), median_summary(loads["vlora"])
    rows = compare(load_a, load_b)
    text = [f"vlora-load ({scenario.name}), closed loop c=8, images, 4 adapters; median of {args.rounds} alternating rounds of "
            f"{args.requests} requests after {args.warmup} warm-up (A = vLLM's server, B = vlora):",
            compare_table([r for r in rows if "/" not in r[0]])]
    if bench["vllm"] and bench["vlora"]:
        a, b = median_summary(bench["vllm"]), median_summary(bench["vlora"])
        keys = [k for k in ("output_throughput", "request_throughput", "median_ttft_ms", "p99_ttft_ms",
                            "median_tpot_ms", "median_itl_ms") if k in a and k in b]
        text += ["", f"vllm bench serve client (text only, random 64/64, c=8, LoRA uniform; median of "
                     f"{len(bench['vllm'])}/{len(bench['vlora'])} rounds):",
                 compare_table([(k, a[k], b[k], b[k] / a[k] if a[k] else None) for k in keys])]
    else:
        text += ["", "vllm bench serve client: no result (see vllm-bench-*.log)"]
    singles = ({kind: pooled([args.out / "rounds" / f"{kind}-single-{r}" for r in range(args.rounds)]) for kind in kinds}
               if args.single_requests else {})
    if singles:
        text += ["", f"one request at a time (no queueing; {args.rounds} rounds of {args.single_requests} pooled, "
                     "A = vLLM's server, B = vlora):", single_table(singles["vllm"], singles["vlora"])]
    if loads.get("vllm-pinned"):
        control = median_summary(loads["vllm-pinned"])
        text += ["", "the control, c=8: A = vLLM's server with its API process pinned off its worker's cores by hand "
                     "(what --api-cpus auto does for vlora's), B = vlora:",
                 compare_table([r for r in compare(control, load_b) if r[0] in CONTROL_FIGURES])]
        if singles.get("vllm-pinned"):
            text += ["", "the control, one request at a time (A = vLLM's server pinned by hand, B = vlora):",
                     single_table(singles["vllm-pinned"], singles["vlora"])]
    per_round = [(b["output_tokens_per_s"] / a["output_tokens_per_s"], b["ttft"]["p50"] / a["ttft"]["p50"])
                 for a, b in zip(loads["vllm"], loads["vlora"], strict=True)]
    text += ["", "per round (vlora / vLLM): " + "; ".join(f"tok/s {t:.3f}, TTFT p50 {f:.3f}" for t, f in per_round)]
    tput = load_b["output_tokens_per_s"] / load_a["output_tokens_per_s"]
    ttft = load_b["ttft"]["p50"] / load_a["ttft"]["p50"]
    targets = [("c=8 output tok/s", tput, ">=", 1.03), ("c=8 TTFT p50", ttft, "<=", 0.95)]
    if singles:
        a, b = singles["vllm"], singles["vlora"]
        streamed = token_streamed_kinds(a, b)
        targets += [("one at a time TTFT p50", p50(b["all"], "ttft") / p50(a["all"], "ttft"), "<=", 1.0),
                    (f"one at a time TPOT p50 ({', '.join(streamed) or 'no kind'} streamed token by token)",
                     p50([r for k in streamed for r in b[k]], "tpot") / p50([r for k in streamed for r in a[k]], "tpot"),
                     "<=", 1.0)]
    met = [(value >= bound) if op == ">=" else (value <= bound) for _, value, op, bound in targets]
    text += ["targets: " + "; ".join(f"{name} {value:.3f} ({op} {bound:.2f}: {'met' if ok else 'NOT met'})"
                                     for (name, value, op, bound), ok in zip(targets, met, strict=True))
             + f"; took {time.monotonic() - started:.0f} s"]
    report = "\n".join(text)
    (args.out / "comparison.txt").write_text(report + "\n")
    (args.out / "results.json").write_text(json.dumps({"load": loads, "vllm_bench": bench, "single": {
        kind: {k: {f: p50(v, f) for f in ("ttft", "tpot", "e2e", "chunks/token")} | {"n": len(v)} for k, v in by_kind.items()}
        for kind, by_kind in singles.items()}}, indent=2))
    print(report)


if __name__ == "__main__":
    main()

"""Serving benchmark: vLLM's own OpenAI server vs vlora, same model, adapters, engine settings and traffic.

    .venv/bin/python bench/serving_bench.py [--requests 96] [--out bench/results/serving]

On this machine (127.0.0.1 only, bounded in time), one after the other:
  (a) `python -m vllm.entrypoints.openai.api_server` with the tiny model and 4 LoRA adapters,
  (b) `vlora-serve` with the same model, adapters and engine settings,
each measured with the same `vlora-load` scenario (closed loop, concurrency 8, images, 4 adapters) and
with vLLM's own benchmark client (`vllm.benchmarks.serve`, random prompts, LoRA names spread uniformly).
Prints (and writes) the ratio table vlora / vLLM. Targets: output tokens/s >= 1.00x, TTFT p50 <= 1.05x.
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


def start(kind: str, model: Path, adapters: dict[str, Path], out: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONUNBUFFERED": "1"}
    if kind == "vllm":
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
               "--served-model-name", model.name, "--host", "127.0.0.1", "--port", str(port), "--enable-lora",
               "--lora-modules", *[f"{n}={p}" for n, p in adapters.items()]]
        cmd += [x for k, v in ENGINE.items() for x in (f"--{k}", v)]
        cmd += ["--limit-mm-per-prompt", json.dumps({"image": 4, "video": 0}), "--seed", "0"]
        ready = "/health"
    else:
        cmd = [sys.executable, "-m", "service", "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
               "--log-format", "text", "--log-level", "warning"]
        cmd += [x for n, p in adapters.items() for x in ("--adapter", f"{n}={p}")]
        cmd += [x for k, v in ENGINE.items() for x in (f"--{k}", v)]
        ready = "/ready"
    log = open(out / f"{kind}-server.log", "wb")
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serving")
    args = parser.parse_args()
    from trainer.cli import ensure_demo_assets, ensure_random_adapters

    models = ROOT / "models"
    ensure_demo_assets(models)
    model = models / "tiny-qwen3-vl"
    adapters = {"colors": models / "adapters" / "colors", "shapes": models / "adapters" / "shapes",
                **ensure_random_adapters(models / "test-adapters", model)}
    args.out.mkdir(parents=True, exist_ok=True)
    scenario = ROOT / "loadtests" / "scenarios" / "closed-c8.yaml"
    results: dict[str, dict] = {}
    started = time.monotonic()
    for kind in ("vllm", "vlora"):
        proc, url = start(kind, model, adapters, args.out)
        try:
            run_dir = args.out / f"{kind}-load"
            subprocess.run([sys.executable, "-m", "loadtests", "run", "--url", url, "--scenario", str(scenario),
                            "--max-requests", str(args.requests), "--adapters", ",".join(adapters),
                            "--out", str(run_dir)], check=True, timeout=600, capture_output=True)
            results[kind] = {"load": json.loads((run_dir / "summary.json").read_text()),
                             "vllm_bench": vllm_bench_client(url, model.name, model, list(adapters), args.requests,
                                                             args.out)}
        finally:
            stop(proc)
    rows = compare(results["vllm"]["load"], results["vlora"]["load"])
    text = ["vlora-load, closed loop c=8, images, 4 adapters (A = vLLM's server, B = vlora):",
            compare_table([r for r in rows if "/" not in r[0]])]
    a, b = results["vllm"]["vllm_bench"], results["vlora"]["vllm_bench"]
    if a and b:
        keys = [k for k in ("output_throughput", "request_throughput", "median_ttft_ms", "p99_ttft_ms",
                            "median_tpot_ms", "median_itl_ms") if k in a and k in b]
        text += ["", "vllm bench serve client (text only, random 64/64, c=8, LoRA uniform):",
                 compare_table([(k, a[k], b[k], b[k] / a[k] if a[k] else None) for k in keys])]
    else:
        text += ["", "vllm bench serve client: no result (see vllm-bench-*.log)"]
    load_a, load_b = results["vllm"]["load"], results["vlora"]["load"]
    tput = load_b["output_tokens_per_s"] / load_a["output_tokens_per_s"]
    ttft = load_b["ttft"]["p50"] / load_a["ttft"]["p50"]
    text += ["", f"targets: output tok/s ratio {tput:.3f} (>= 1.00: {'met' if tput >= 1.0 else 'NOT met'}), "
             f"TTFT p50 ratio {ttft:.3f} (<= 1.05: {'met' if ttft <= 1.05 else 'NOT met'}); "
             f"took {time.monotonic() - started:.0f} s"]
    report = "\n".join(text)
    (args.out / "comparison.txt").write_text(report + "\n")
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(report)


if __name__ == "__main__":
    main()

"""Cold-load cost of an adapter: TTFT of the first request to an unloaded adapter minus its warm TTFT.

    .venv/bin/python bench/adapter_cold_load.py [--adapters 20] [--out bench/results/cold-load]

Makes N random adapters of the tiny model (cached under models/bench-adapters), starts `vlora-serve`
on 127.0.0.1 with them under its adapter root and `--preload none`, then per adapter sends one
streaming request (cold: resolution, checks, engine load, first token) and then three more (warm), and
reports the p50 / p90 / max of cold minus median warm TTFT. Target: p50 <= 150 ms on the tiny model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serving_bench import free_port, wait_ready  # noqa: E402
from tests.images import data_uri, encode, image_message, shape_image  # noqa: E402

TARGET_P50_S = 0.150


def ttft(client: httpx.Client, url: str, model: str, image: str) -> float:
    body = {"model": model, "messages": image_message(image), "max_tokens": 4, "temperature": 0, "stream": True}
    started = time.perf_counter()
    with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
                return time.perf_counter() - started
            if line == "data: [DONE]":
                break
    return time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    import subprocess

    from trainer.demo import ensure_tiny_model
    from trainer.tiny import make_random_adapter

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapters", type=int, default=20)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cold-load")
    args = p.parse_args()

    model = ensure_tiny_model(ROOT / "models")
    root = ROOT / "models" / "bench-adapters"
    for i in range(args.adapters):
        if not (root / f"a{i:02d}" / "adapter_config.json").is_file():
            make_random_adapter(model, root / f"a{i:02d}", rank=8, seed=100 + i, overwrite=True)
    args.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = open(args.out / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "service", "--model", str(model), "--adapter-dir", str(root),
                             "--preload", "none", "--max-loras", "4", "--max-cpu-loras", str(args.adapters + 4),
                             "--host", "127.0.0.1", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    rows = []
    try:
        wait_ready(base_url, "/ready", proc)
        url = f"{base_url}/v1/chat/completions"
        image = data_uri(encode(shape_image("red")))
        with httpx.Client(timeout=120) as client:
            for _ in range(5):  # warm the engine and the base path first
                ttft(client, url, model.name, image)
            for i in range(args.adapters):
                name = f"a{i:02d}"
                cold = ttft(client, url, name, image)
                warm = statistics.median(ttft(client, url, name, image) for _ in range(3))
                rows.append({"adapter": name, "cold_s": cold, "warm_s": warm, "cost_s": cold - warm})
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()
    costs = [r["cost_s"] for r in rows]
    summary = {"adapters": len(rows), "cold_cost_p50_s": statistics.median(costs),
               "cold_cost_p90_s": percentile(costs, 0.9), "cold_cost_max_s": max(costs),
               "warm_ttft_p50_s": statistics.median(r["warm_s"] for r in rows), "target_p50_s": TARGET_P50_S}
    (args.out / "results.json").write_text(json.dumps({"summary": summary, "rows": rows}, indent=2))
    lines = [f"adapter cold-load cost on this machine ({len(rows)} adapters, rank 8, tiny model):",
             f"{'figure':<22}{'seconds':>10}"]
    lines += [f"{k:<22}{v:>10.4f}" for k, v in summary.items() if k.endswith("_s")]
    met = "met" if summary["cold_cost_p50_s"] <= TARGET_P50_S else "NOT met"
    lines.append(f"target: cold-load cost p50 <= {TARGET_P50_S * 1000:.0f} ms: {met}")
    (args.out / "summary.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

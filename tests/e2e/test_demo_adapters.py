"""The trained demo adapters, served: accuracy targets, and the service agrees with the trainer's eval."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import pytest
from openai import AsyncOpenAI

from tests.e2e.server import start_server
from trainer.data import load_dataset_file, prompt_and_answer
from trainer.evaluate import normalise

TASKS = ("colors", "shapes")


@pytest.fixture(scope="module")
def server(trained_demo, tmp_path_factory):
    args = ["--model", str(trained_demo / "tiny-qwen3-vl")]
    for task in TASKS:
        args += ["--adapter", f"{task}={trained_demo / 'adapters' / task}"]
    srv = start_server(args, tmp_path_factory.mktemp("demo-server") / "server.log")
    yield srv
    srv.stop()


def _to_openai(messages: list[dict]) -> list[dict]:
    out = []
    for m in messages:
        content = []
        for part in m["content"]:
            if part["type"] == "text":
                content.append({"type": "text", "text": part["text"]})
            else:
                data = base64.b64encode(Path(part["image"]).read_bytes()).decode()
                content.append({"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}})
        out.append({"role": m["role"], "content": content})
    return out


async def _served_accuracy(url: str, model: str, records: list[dict], max_tokens: int) -> float:
    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    gate = asyncio.Semaphore(8)

    async def one(record):
        messages, answer = prompt_and_answer(record)
        async with gate:
            r = await client.chat.completions.create(model=model, messages=_to_openai(messages), temperature=0,
                                                     max_tokens=max_tokens)
        return normalise(r.choices[0].message.content) == normalise(answer)

    hits = await asyncio.gather(*(one(r) for r in records))
    await client.close()
    return sum(hits) / len(hits)


@pytest.mark.parametrize("task", TASKS)
def test_served_adapter_matches_trainer_eval(server, trained_demo, task):
    adapter = trained_demo / "adapters" / task
    trainer_eval = json.loads((adapter / "eval.json").read_text())
    config = json.loads((adapter / "train_config.json").read_text())
    records = load_dataset_file(trained_demo / "demo-data" / task / "val.jsonl")[: trainer_eval["adapter"]["n"]]
    served = asyncio.run(_served_accuracy(server.url, task, records, config["eval_max_new_tokens"]))
    assert abs(served - trainer_eval["adapter"]["exact_match"]) <= 0.01, (served, trainer_eval["adapter"])
    base = asyncio.run(_served_accuracy(server.url, "tiny-qwen3-vl", records[:50], config["eval_max_new_tokens"]))
    assert base <= 0.30


@pytest.mark.parametrize("task", TASKS)
def test_demo_adapter_accuracy_targets(trained_demo, task):
    result = json.loads((trained_demo / "adapters" / task / "eval.json").read_text())
    assert result["adapter"]["n"] >= 200
    assert result["adapter"]["exact_match"] >= 0.90, result["adapter"]
    assert result["base"]["exact_match"] <= 0.30, result["base"]


@pytest.mark.parametrize("task", TASKS)
def test_eval_through_vllm_agrees_with_transformers(trained_demo, task, tmp_path):
    import subprocess
    import sys

    adapter = trained_demo / "adapters" / task
    trainer_eval = json.loads((adapter / "eval.json").read_text())  # the recipe's: transformers' generate
    config = json.loads((adapter / "train_config.json").read_text())
    out = tmp_path / "eval.json"
    proc = subprocess.run([sys.executable, "-m", "trainer", "eval", "--adapter", str(adapter), "--data",
                           str(trained_demo / "demo-data" / task / "val.jsonl"), "--backend", "vllm",
                           "--max-samples", str(trainer_eval["adapter"]["n"]),
                           "--max-new-tokens", str(config["eval_max_new_tokens"]), "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    through_vllm = json.loads(out.read_text())
    assert through_vllm["backend"] == "vllm"
    for who in ("adapter", "base"):  # within one point of exact match
        assert abs(through_vllm[who]["exact_match"] - trainer_eval[who]["exact_match"]) <= 0.01, (who, through_vllm[who],
                                                                                                 trainer_eval[who])

"""One model beyond one device: the engine split over two tensor-parallel workers, and two data-parallel engine
replicas in one server, on the CPU backend (real vLLM workers, two processes each). The trained demo adapters
must answer as the trainer's eval says, whichever worker layout runs them. (Pipeline parallelism does not run
on vLLM's CPU backend: a start-up error, unit-tested in tests/unit/test_app.py.)"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from tests.e2e.server import start_server
from tests.e2e.test_demo_adapters import TASKS, _served_accuracy
from trainer.data import load_dataset_file

RECORDS = 40  # per adapter


@pytest.fixture(scope="module", params=[["--tensor-parallel-size", "2"], ["--data-parallel-size", "2"]],
                ids=["tp2", "dp2"])
def parallel_server(request, trained_demo, tmp_path_factory):
    args = ["--model", str(trained_demo / "tiny-qwen3-vl"), "--max-num-seqs", "8", *request.param]
    for task in TASKS:
        args += ["--adapter", f"{task}={trained_demo / 'adapters' / task}"]
    srv = start_server(args, tmp_path_factory.mktemp("parallel-server") / "server.log")
    yield ("tp2" if "--tensor-parallel-size" in request.param else "dp2"), srv
    srv.stop()


def test_adapters_answer_as_the_trainer_measured(parallel_server, trained_demo):
    layout, srv = parallel_server
    for task in TASKS:
        adapter = trained_demo / "adapters" / task
        expected = json.loads((adapter / "eval.json").read_text())["adapter"]["exact_match"]
        max_tokens = json.loads((adapter / "train_config.json").read_text())["eval_max_new_tokens"]
        records = load_dataset_file(trained_demo / "demo-data" / task / "val.jsonl")[:RECORDS]
        served = asyncio.run(_served_accuracy(srv.url, task, records, max_tokens))
        assert served >= expected - 0.05, (layout, task, served, expected)
    metrics = httpx.get(f"{srv.url}/metrics", timeout=10).text
    if layout == "dp2":  # both engine replicas report to the same scrape, and both ran requests
        for engine in ("0", "1"):
            assert f'vllm:request_success_total{{engine="{engine}"' in metrics
            total = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                        if line.startswith(f'vllm:request_success_total{{engine="{engine}"'))
            assert total > 0, (engine, total)

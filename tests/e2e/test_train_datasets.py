"""Training from a dataset as people have it: parquet shards with the images embedded (the hub's VLM layout),
streamed, tracked with TensorBoard, killed with SIGKILL and resumed from the next unseen record; tracked with
MLflow (a local file store, no server); `validate` on it. Compared with the project's JSONL of the same samples."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.e2e.test_trainer import SHORT, kill_after_checkpoint, run_train
from trainer.demo_data import make_demo_dataset

STEPS = 40  # two passes over the 160 records at batch 8


def to_hub_parquet(src, split: str, out) -> None:
    """The demo JSONL as the hub's VLM SFT layout: placeholders in `messages`, PNG bytes in `images`."""
    import datasets

    messages, images = [], []
    for line in (src / f"{split}.jsonl").read_text().splitlines():
        user, answer = json.loads(line)["messages"]
        messages.append([{"role": "user", "content": [
            {"type": p["type"], "text": p.get("text")} for p in user["content"]]},
            {"role": "assistant", "content": [{"type": "text", "text": answer["content"]}]}])
        images.append([{"bytes": (src / p["image"]).read_bytes(), "path": None}
                       for p in user["content"] if p["type"] == "image"])
    features = datasets.Features({
        "messages": [{"role": datasets.Value("string"),
                      "content": [{"type": datasets.Value("string"), "text": datasets.Value("string")}]}],
        "images": datasets.List(datasets.Image()),
    })
    datasets.Dataset.from_dict({"messages": messages, "images": images}, features=features).to_parquet(str(out))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    src = make_demo_dataset("colors", root / "colors", seed=1, n_train=160, n_val=24)
    to_hub_parquet(src, "train", root / "train.parquet")
    to_hub_parquet(src, "val", root / "val.parquet")
    return root, src


def _losses(out) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in json.loads((out / "log_history.json").read_text()) if "loss" in e}


def test_validate_reports_the_parquet_set(data, demo_assets):
    root, _ = data
    proc = subprocess.run([sys.executable, "-m", "trainer", "validate", str(root / "train.parquet"), "--model",
                           str(demo_assets["model"]), "--max-length", "200"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "160 records" in proc.stdout and "format messages" in proc.stdout and "images per record  1: 160" \
        in proc.stdout
    assert "tokens per record  p50" in proc.stdout and "over max_length 200: " in proc.stdout
    assert "Failed to load CPU gemm_4bit_forward" not in proc.stderr  # not an error of the user's


def test_streamed_parquet_resumes_after_kill_9_where_it_stopped(data, demo_assets, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, src = data
    common = ["--base-model", str(demo_assets["model"]), "--train-data", str(root / "train.parquet"),
              "--eval-data", str(root / "val.parquet"), "--streaming", "--max-steps", str(STEPS),
              "--save-steps", "10", "--report-to", "tensorboard", "--run-name", "streamed", *SHORT]
    whole = tmp_path / "whole"
    run_train(*common, "--output-dir", str(whole))
    # The same run, killed with SIGKILL after its first checkpoint, then resumed.
    out = tmp_path / "killed"
    saved = kill_after_checkpoint([*common, "--output-dir", str(out)], out.with_name("killed.partial"), 10)[-1]
    assert saved < 20, "killed within the first pass over the stream"
    done = run_train(*common, "--output-dir", str(out), "--resume", env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert "resuming from" in done.stdout
    # Continued from the next unseen record: every loss after the checkpoint is the uninterrupted run's.
    resumed, uninterrupted = _losses(out), _losses(whole)
    after = [s for s in uninterrupted if s > saved]
    assert after and all(abs(resumed[s] - uninterrupted[s]) < 1e-4 for s in after), (resumed, uninterrupted)
    # TensorBoard's own reader finds the scalars and the attached manifest in the adapter's folder.
    assert [p.name for p in (out / "runs").iterdir()] == ["streamed"]  # one folder, across the resume
    events = EventAccumulator(str(out / "runs" / "streamed")).Reload()
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "train/train_tokens_per_second"} <= \
        set(events.Tags()["scalars"])
    assert "manifest.json/text_summary" in events.Tags()["tensors"]
    manifest = json.loads((out / "manifest.json").read_text())["dataset"]
    assert manifest["format"] == "messages" and manifest["records"] == 160 and manifest["streaming"]
    assert len(manifest["fingerprint"]) == 64
    # The same samples as the project's JSONL: the same accuracy, within the sampling order's difference.
    jsonl = tmp_path / "jsonl"
    run_train("--base-model", str(demo_assets["model"]), "--train-data", str(src / "train.jsonl"),
              "--eval-data", str(src / "val.jsonl"), "--max-steps", str(STEPS), "--output-dir", str(jsonl), *SHORT)
    streamed_em = json.loads((out / "eval.json").read_text())["adapter"]["exact_match"]
    jsonl_em = json.loads((jsonl / "eval.json").read_text())["adapter"]["exact_match"]
    assert abs(streamed_em - jsonl_em) <= 0.2 and streamed_em > 0, (streamed_em, jsonl_em)


@pytest.mark.parametrize("streamed", [False, True], ids=["map", "streamed"])
def test_packed_training_with_accumulation_resumes_after_kill_9_where_it_stopped(data, demo_assets, tmp_path,
                                                                                streamed):
    """Packed rows (a map-style set, or a stream packed window by window), two rows a batch, two batches an
    optimizer step: killed with SIGKILL after a checkpoint and resumed, every later loss is the uninterrupted
    run's (the resumed run skips exactly the rows it trained on)."""
    root, _ = data
    steps = 12
    common = ["--base-model", str(demo_assets["model"]), "--train-data", str(root / "train.parquet"),
              "--eval-data", str(root / "val.parquet"), "--max-steps", str(steps), "--save-steps", "4", *SHORT,
              "--packing", "--packed-length", "256", "--per-device-batch-size", "2", "--grad-accum", "2",
              *(["--streaming", "--shuffle-buffer", "64"] if streamed else [])]
    whole = tmp_path / "whole"
    done = run_train(*common, "--output-dir", str(whole))
    assert "packing:" in done.stdout
    out = tmp_path / "killed"
    saved = kill_after_checkpoint([*common, "--output-dir", str(out)], out.with_name("killed.partial"), 4)[-1]
    assert saved < steps
    done = run_train(*common, "--output-dir", str(out), "--resume", env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert "resuming from" in done.stdout
    resumed, uninterrupted = _losses(out), _losses(whole)
    after = [s for s in uninterrupted if s > saved]
    assert after and all(abs(resumed[s] - uninterrupted[s]) < 1e-4 for s in after), (resumed, uninterrupted)
    packing = json.loads((out / "manifest.json").read_text())["dataset"]["packing"]
    assert packing["packed_length"] == 256 and packing.get("streaming", False) == streamed


def test_mlflow_file_store_gets_metrics_tags_config_and_manifest(data, demo_assets, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow's local file store, read back here
    root, _ = data
    store = f"file://{tmp_path / 'mlruns'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "MLFLOW_ALLOW_FILE_STORE": "true"}
    out = tmp_path / "tracked"
    run_train("--base-model", str(demo_assets["model"]), "--train-data", str(root / "train.parquet"),
              "--eval-data", str(root / "val.parquet"), "--max-steps", "6", "--output-dir", str(out),
              "--report-to", "mlflow", "--run-tags", "colors,nightly", *SHORT, env=env)
    client = MlflowClient(tracking_uri=store)
    run, = client.search_runs([client.get_experiment_by_name("vlora").experiment_id])
    assert run.info.run_name == "tracked" and {"colors", "nightly"} <= set(run.data.tags)
    assert {"loss", "learning_rate", "grad_norm", "train_tokens_per_second"} <= set(run.data.metrics)
    assert run.data.params["per_device_train_batch_size"] == "8"
    assert {"manifest.json", "train_config.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}


def test_wandb_offline_run_gets_metrics_tags_and_the_manifest(data, demo_assets, tmp_path):
    root, _ = data
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}
    out = tmp_path / "wandb-tracked"
    run_train("--base-model", str(demo_assets["model"]), "--train-data", str(root / "train.parquet"),
              "--eval-data", str(root / "val.parquet"), "--max-steps", "4", "--output-dir", str(out),
              "--report-to", "wandb", "--run-tags", "colors,nightly", *SHORT, env=env)
    run, = (tmp_path / "wandb").glob("offline-run-*")
    assert json.loads((run / "files" / "manifest.json").read_text()) == json.loads((out / "manifest.json").read_text())
    # The run's records (W&B's own binary log, which only its sync reads): the metrics and tags are in it.
    records = next(run.glob("run-*.wandb")).read_bytes()
    for needle in (b"train/loss", b"train/train_tokens_per_second", b"train/grad_norm", b"nightly", b"wandb-tracked"):
        assert needle in records, needle

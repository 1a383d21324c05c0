"""The trainer end to end on the tiny model: outputs, refusals, resume after kill -9, merge parity."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer.demo_data import make_demo_dataset

SHORT = ["--lora-r", "8", "--lora-alpha", "8", "--learning-rate", "1e-3", "--per-device-batch-size", "8",
         "--grad-accum", "1", "--no-gradient-checkpointing", "--eval-steps", "0", "--logging-steps", "2",
         "--eval-max-new-tokens", "4", "--eval-max-samples", "24", "--golden-samples", "2", "--eval-backend",
         "transformers"]


def run_train(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "trainer", "train", *args], capture_output=True, text=True,
                          timeout=600, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stdout[-3000:] + proc.stderr[-3000:])
    return proc


def kill_after_checkpoint(args: list[str], partial: Path, step: int) -> list[int]:
    """Start `vlora-train train ARGS`, SIGKILL it once checkpoint-STEP is complete; the complete checkpoints."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "train", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (partial / f"checkpoint-{step}" / "trainer_state.json").is_file():
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    return sorted(int(p.name.split("-")[1]) for p in partial.glob("checkpoint-*") if (p / "trainer_state.json").is_file())


@pytest.fixture(scope="module")
def colors(tmp_path_factory):
    return make_demo_dataset("colors", tmp_path_factory.mktemp("data") / "colors", seed=1, n_train=160, n_val=24)


@pytest.fixture(scope="module")
def trained(demo_assets, colors, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "colors"
    run_train("--base-model", str(demo_assets["model"]), "--train-data", str(colors / "train.jsonl"),
              "--eval-data", str(colors / "val.jsonl"), "--output-dir", str(out), "--max-steps", "30", *SHORT)
    return out


def test_outputs_and_manifest(trained, demo_assets):
    for name in ("adapter_config.json", "adapter_model.safetensors", "manifest.json", "train_config.json",
                 "eval.json", "loss_curve.png", "log_history.json"):
        assert (trained / name).is_file(), name
    assert not trained.with_name("colors.partial").exists()
    manifest = json.loads((trained / "manifest.json").read_text())
    assert manifest["lora"]["r"] == 8 and manifest["lora"]["alpha"] == 8
    assert len(manifest["targets"]["language"]) == 14 and manifest["targets"]["vision"] == []
    assert manifest["serving"]["vllm_applies_all"] is True
    assert manifest["base"]["config_sha256"] and manifest["base"]["weights_sha256"]
    assert manifest["processor"]["max_pixels"] and len(manifest["chat_template_sha256"]) == 64
    golden = manifest["golden_samples"]
    assert len(golden) == 2 and all((trained / g["images"][0]["file"]).is_file() for g in golden)
    assert manifest["eval"]["adapter"]["n"] == 24
    train_config = json.loads((trained / "train_config.json").read_text())
    assert train_config["max_steps"] == 30 and train_config["lora_r"] == 8
    losses = [e["loss"] for e in json.loads((trained / "log_history.json").read_text()) if "loss" in e]
    assert losses[-1] < losses[0] / 2  # it learns


def test_invalid_data_is_refused_with_the_report_and_no_output(demo_assets, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": [{"type": "image", "image": "nope.png"},
                                                                          {"type": "text", "text": "q"}]}]}) + "\n")
    proc = run_train("--base-model", str(demo_assets["model"]), "--train-data", str(data),
                     "--output-dir", str(tmp_path / "out"), check=False)
    assert proc.returncode != 0
    assert "line 1" in proc.stderr and "missing" in proc.stderr and "no assistant turn" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()  # nothing left behind
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "q"},
                                             {"role": "assistant", "content": "a"}]}) + "\n")
    fixed = run_train("--base-model", str(demo_assets["model"]), "--train-data", str(data), "--max-steps", "1",
                      "--output-dir", str(tmp_path / "out"), "--val-fraction", "0", *SHORT, check=False)
    assert fixed.returncode == 0, fixed.stderr[-2000:]  # the fixed data trains: no stale run is in the way


def test_a_base_model_found_nowhere_is_one_line(tmp_path, colors):
    proc = run_train("--base-model", "models/no-such-model", "--train-data", str(colors / "train.jsonl"),
                     "--output-dir", str(tmp_path / "out"), check=False, cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "found neither locally" in proc.stderr and str(tmp_path / "models" / "no-such-model") in proc.stderr
    assert not (tmp_path / "out.partial").exists()


def test_overlong_records_are_refused_or_dropped_never_cut(demo_assets, colors, tmp_path):
    records = [json.loads(line) for line in (colors / "train.jsonl").read_text().splitlines()[:16]]
    for r in records[:3]:
        r["messages"][-1]["content"] = "red " * 200  # far over the limit below
    data = colors / "mixed.jsonl"  # beside the images its records name
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    args = ["--base-model", str(demo_assets["model"]), "--train-data", str(data), "--max-length", "160",
            "--max-steps", "2", "--val-fraction", "0", *SHORT]
    refused = run_train(*args, "--output-dir", str(tmp_path / "a"), check=False)
    assert refused.returncode != 0 and "over max_length 160" in refused.stderr and "line 3" in refused.stderr
    assert not (tmp_path / "a.partial").exists()
    run_train(*args, "--truncation", "drop", "--output-dir", str(tmp_path / "b"))
    dataset = json.loads((tmp_path / "b" / "manifest.json").read_text())["dataset"]
    assert dataset["dropped_overlong"] == 3 and dataset["train_records"] == 13


@pytest.mark.parametrize("args,needle", [
    (["--targets", "everything"], "unknown target preset"),
    (["--train-data", "/nonexistent.jsonl"], "does not exist"),
])
def test_user_mistakes_give_one_clear_message(demo_assets, tmp_path, args, needle):
    base = ["--base-model", str(demo_assets["model"]), "--train-data", "x.jsonl", "--output-dir", str(tmp_path / "o")]
    proc = run_train(*base, *args, check=False)
    assert proc.returncode != 0 and needle in proc.stderr and "Traceback" not in proc.stderr


def test_bad_yaml_key(demo_assets, tmp_path):
    (tmp_path / "c.yaml").write_text("learning_rte: 0.1\n")
    proc = run_train("--config", str(tmp_path / "c.yaml"), check=False)
    assert proc.returncode != 0 and "did you mean learning_rate" in proc.stderr


def test_resume_after_kill_9(demo_assets, colors, tmp_path):
    out = tmp_path / "run"
    args = ["--base-model", str(demo_assets["model"]), "--train-data", str(colors / "train.jsonl"),
            "--eval-data", str(colors / "val.jsonl"), "--output-dir", str(out), "--max-steps", "400",
            "--save-steps", "10", "--save-total-limit", "3", *SHORT]
    partial = out.with_name("run.partial")
    saved = kill_after_checkpoint(args, partial, 20)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    assert not out.exists(), "a killed run must not leave a complete-looking output directory"
    assert saved and saved[-1] >= 20
    # Without --resume the interrupted run is not silently overwritten.
    refused = run_train(*args, check=False)
    assert refused.returncode != 0 and "--resume" in refused.stderr
    done = run_train(*args, "--max-steps", "400", "--resume", env=env)
    assert f"resuming from {partial / f'checkpoint-{saved[-1]}'}" in done.stdout
    history = json.loads((out / "log_history.json").read_text())
    steps = [e["step"] for e in history if "loss" in e]
    assert steps[-1] == 400
    # No step lost beyond the last save: logging continues right after the checkpoint.
    assert min(s for s in steps if s > saved[-1]) <= saved[-1] + 2


def test_merge_with_parity(trained, colors, tmp_path):
    from trainer.merge import merge

    report = merge(str(trained), str(tmp_path / "merged"), data=str(colors / "val.jsonl"), k=3)
    assert report["outputs_equal"] and report["samples"] == 3
    assert report["max_logit_diff"] < 1e-2
    assert (tmp_path / "merged" / "config.json").is_file() and (tmp_path / "merged" / "merge_report.json").is_file()
    from transformers import AutoModelForImageTextToText

    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_merge_refuses_a_quantized_base(trained, tmp_path, demo_assets):
    from trainer.merge import merge

    fake = tmp_path / "q4"
    fake.mkdir()
    config = json.loads((Path(demo_assets["model"]) / "config.json").read_text())
    config["quantization_config"] = {"load_in_4bit": True}
    (fake / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="quantized checkpoint"):
        merge(str(trained), str(tmp_path / "m"), base_model=str(fake))
    assert not (tmp_path / "m").exists()


def test_qlora_trains_on_cpu(demo_assets, colors, tmp_path):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "q"
    run_train("--base-model", str(demo_assets["model"]), "--train-data", str(colors / "train.jsonl"),
              "--eval-data", str(colors / "val.jsonl"), "--output-dir", str(out), "--max-steps", "4",
              "--quantization", "4bit", *SHORT)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["lora"]["quantization"] == "4bit"


def test_eval_cli_scores_adapter_and_base(trained, colors, tmp_path):
    out = tmp_path / "eval.json"
    proc = subprocess.run([sys.executable, "-m", "trainer", "eval", "--adapter", str(trained), "--data",
                           str(colors / "val.jsonl"), "--max-samples", "8", "--max-new-tokens", "4", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    for who in ("adapter", "base"):
        assert result[who]["n"] == 8 and {"exact_match", "bleu", "rouge_l"} <= set(result[who])
    assert len(result["samples"]) == 8 and "exact match" in proc.stdout


def test_final_eval_through_vllms_offline_engine(demo_assets, colors, tmp_path):
    out = tmp_path / "vllm-eval"
    run_train("--base-model", str(demo_assets["model"]), "--train-data", str(colors / "train.jsonl"),
              "--eval-data", str(colors / "val.jsonl"), "--output-dir", str(out), "--max-steps", "4", *SHORT,
              "--eval-backend", "vllm")
    result = json.loads((out / "eval.json").read_text())
    assert result["backend"] == "vllm" and result["adapter"]["n"] == 24 and result["base"]["n"] == 24
    assert json.loads((out / "manifest.json").read_text())["eval"]["backend"] == "vllm"


def test_packed_training_fills_rows_and_counts_real_tokens(demo_assets, colors, tmp_path):
    out = tmp_path / "packed"
    run_train("--base-model", str(demo_assets["model"]), "--train-data", str(colors / "train.jsonl"),
              "--eval-data", str(colors / "val.jsonl"), "--output-dir", str(out), "--max-steps", "6", *SHORT,
              "--packing", "--packed-length", "256", "--per-device-batch-size", "2")
    packing = json.loads((out / "manifest.json").read_text())["dataset"]["packing"]
    assert packing["packed_length"] == 256 and packing["rows"] < 160 / 4 and packing["padding_fraction"] < 0.2
    logged = [e for e in json.loads((out / "log_history.json").read_text()) if "num_input_tokens_seen" in e]
    assert 0 < logged[-1]["num_input_tokens_seen"] < 6 * 2 * 256  # real tokens, not the rows' padded tails


@pytest.mark.parametrize("extra", [[], ["--packing", "--packed-length", "256", "--per-device-batch-size", "2"]],
                         ids=["padded", "packed"])
def test_two_processes_through_torchrun(demo_assets, colors, tmp_path, extra):
    """The documented multi-GPU launch (torchrun, DDP through the Trainer), on two CPU processes (gloo):
    one adapter directory, written once, with the steps of both processes' batches; packed rows too (every
    process packs the same rows from the seed; the sampler splits them)."""
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "trainer", "train",
         "--base-model", str(demo_assets["model"]), "--train-data", str(colors / "train.jsonl"),
         "--eval-data", str(colors / "val.jsonl"), "--output-dir", str(out), "--max-steps", "4",
         *SHORT, *extra], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("adapter written to") == 1  # the first process finishes the directory
    assert (out / "adapter_model.safetensors").is_file() and (out / "manifest.json").is_file()
    history = json.loads((out / "log_history.json").read_text())
    assert [h["step"] for h in history if "loss" in h] == [2, 4]
    assert not Path(str(out) + ".partial").exists()

"""Training config: YAML + flags, and clear refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.cli import build_parser
from trainer.config import TARGET_PRESETS, TrainConfig

CONFIGS = Path(__file__).resolve().parents[2] / "trainer" / "configs"


def test_recipes_load():
    qlora = TrainConfig.load(CONFIGS / "qwen3-vl-8b-qlora.yaml")
    assert (qlora.quantization, qlora.lora_r, qlora.lora_alpha, qlora.lora_dropout) == ("4bit", 16, 32, 0.0)
    assert (qlora.learning_rate, qlora.per_device_batch_size, qlora.grad_accum) == (2e-4, 2, 8)
    # The measured levers (bench/results/train-gpu*): QLoRA keeps checkpointing, skips the fp32 upcast.
    assert qlora.gradient_checkpointing and not qlora.kbit_fp32_upcast and qlora.kernels == "auto"
    lora = TrainConfig.load(CONFIGS / "qwen3-vl-8b-lora.yaml")
    assert not lora.gradient_checkpointing and lora.optim == "adamw_torch_fused" and lora.lora_dropout == 0.0
    for name in ("tiny-colors", "tiny-shapes", "qwen3-vl-8b-lora"):
        assert TrainConfig.load(CONFIGS / f"{name}.yaml").targets == "llm"


def test_flags_override_yaml():
    args = build_parser().parse_args(["train", "--config", str(CONFIGS / "tiny-colors.yaml"), "--lora-r", "4",
                                      "--no-gradient-checkpointing", "--learning-rate", "0.01"])
    overrides = {k: v for k, v in vars(args).items() if k in TrainConfig.field_names()}
    config = TrainConfig.load(args.config, overrides)
    assert (config.lora_r, config.gradient_checkpointing, config.learning_rate) == (4, False, 0.01)
    assert config.lora_alpha == 16  # from the YAML


def test_unknown_key_names_the_fix(tmp_path):
    (tmp_path / "c.yaml").write_text("lora_rank: 8\n")
    with pytest.raises(ValueError, match="lora_rank.*did you mean lora_r"):
        TrainConfig.load(tmp_path / "c.yaml")


@pytest.mark.parametrize("kw,needle", [({"targets": "everything"}, "unknown target preset"),
                                       ({"quantization": "8bit"}, "quantization"),
                                       ({"lora_dropout": 1.5}, "lora_dropout")])
def test_invalid_values(kw, needle):
    with pytest.raises(ValueError, match=needle):
        TrainConfig(**kw)


def test_presets_are_regexes():
    import re

    names = ["model.language_model.layers.0.self_attn.q_proj", "model.visual.blocks.1.attn.qkv",
             "model.visual.merger.linear_fc1", "model.visual.deepstack_merger_list.0.linear_fc2"]
    hits = {k: [n for n in names if re.fullmatch(v, n)] for k, v in TARGET_PRESETS.items()}
    assert hits["llm"] == names[:1]
    assert hits["llm+vision"] == names[:2]
    assert hits["llm+merger"] == [names[0], names[2], names[3]]

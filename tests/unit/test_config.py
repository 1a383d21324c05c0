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
    # ... and captures its checkpointed decoder layers as CUDA graphs (bench/results/train-gpu-graphs-ckpt)
    assert qlora.cuda_graphs and qlora.pad_to_multiple_of == 128
    lora = TrainConfig.load(CONFIGS / "qwen3-vl-8b-lora.yaml")
    assert not lora.gradient_checkpointing and lora.optim == "adamw_torch_fused" and lora.lora_dropout == 0.0
    packed = TrainConfig.load(CONFIGS / "qwen3-vl-8b-lora-packed.yaml")
    assert packed.packing and packed.packed_length == 4096 and packed.longest == 4096 and packed.truncation == "drop"
    # the measured levers of bench/results/train-gpu-varlen-attn: varlen attention, checkpoints inside the graphs
    assert packed.attn_implementation == "varlen" and packed.gradient_checkpointing and packed.cuda_graphs
    qpacked = TrainConfig.load(CONFIGS / "qwen3-vl-8b-qlora-packed.yaml")
    assert (qpacked.quantization, qpacked.packing, qpacked.attn_implementation) == ("4bit", True, "varlen")
    assert qpacked.offload_checkpoints and qpacked.gradient_checkpointing and not qpacked.cuda_graphs
    # packing reads streams too (trainer.packing.PackedStream)
    assert TrainConfig.load(CONFIGS / "qwen3-vl-8b-lora-packed.yaml", {"streaming": True, "max_steps": 10}).packing
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
                                       ({"lora_dropout": 1.5}, "lora_dropout"),
                                       ({"kernels": "rms_norm,flash"}, "kernels must be"),
                                       ({"compile_mode": "fast"}, "compile_mode"),
                                       ({"gc_every": -1}, "gc_every")])
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


def test_liger_parts():
    assert TrainConfig(kernels="none").liger_parts == ()
    assert TrainConfig(kernels="auto").liger_parts == TrainConfig(kernels="liger").liger_parts
    assert "swiglu" in TrainConfig(kernels="liger").liger_parts
    assert TrainConfig(kernels="rope, fused_linear_cross_entropy").liger_parts == ("rope", "fused_linear_cross_entropy")


def _lora_mlp():
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.SiLU(), torch.nn.Linear(32, 8)).to(torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], init_lora_weights=False))
    assert model.base_model.model[0].lora_A["default"].weight.dtype == torch.float32  # peft keeps adapters fp32
    return model


def test_training_speedups_skip_input_casts_with_the_same_result():
    import torch

    from trainer.speedups import training_speedups

    model = _lora_mlp()
    layers = [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        casting = model(x)
        with training_speedups(model, TrainConfig(), autocast=True):
            assert layers and not any(m.cast_input_dtype_enabled for m in layers)
            lean = model(x)
    assert all(m.cast_input_dtype_enabled for m in layers)  # restored for generation outside training
    assert torch.equal(casting, lean)
    with training_speedups(model, TrainConfig(lora_input_cast=True), autocast=True):
        assert all(m.cast_input_dtype_enabled for m in layers)
    with training_speedups(model, TrainConfig(), autocast=False):  # fp32 training: nothing to skip
        assert all(m.cast_input_dtype_enabled for m in layers)


def test_gc_every_steps(monkeypatch):
    import gc
    from types import SimpleNamespace

    from trainer.speedups import gc_callback

    assert gc_callback(TrainConfig(gc_every=0)) is None
    collected = []
    monkeypatch.setattr(gc, "collect", lambda generation=2: collected.append(generation) or 0)
    callback = gc_callback(TrainConfig(gc_every=3))
    try:
        callback.on_train_begin(None, SimpleNamespace(global_step=0), None)
        assert not gc.isenabled()
        for step in range(1, 8):
            callback.on_step_end(None, SimpleNamespace(global_step=step), None)
    finally:
        callback.on_train_end(None, SimpleNamespace(global_step=7), None)
    assert gc.isenabled()
    assert collected == [2, 1, 1]  # a full collection at the start, then one at steps 3 and 6

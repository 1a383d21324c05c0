"""Training speed-ups, each optional and each returning what it did: Liger kernels, regional torch.compile,
CUDA graphs of the decoder layers, no peft input casts under autocast, garbage collection between steps.

`apply_speedups` runs the ones that act on the LoRA-wrapped model, in the order the benchmarks measured, and
returns a `Speedups` record (the CUDA-graphs dispatcher included, for its replay counts at the end).
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from dataclasses import dataclass

from trainer.config import TrainConfig
from trainer.layers import decoder_layers, vision_blocks
from trainer.model import has_cuda


@dataclass
class Speedups:
    compiled_layers: int = 0
    graphs: object | None = None  # trainer.graphs.LayerGraphs when cuda_graphs captured the decoder layers

    def report(self) -> str | None:
        return f"cuda graphs: {self.graphs.stats()}" if self.graphs is not None else None


def apply_kernels(model, config: TrainConfig) -> tuple[str, ...]:
    """Liger's fused kernels for Qwen3-VL's language model (RMSNorm, RoPE, SwiGLU, and the linear
    cross-entropy that never materialises the full-vocabulary logits); returns the parts applied. With
    `torch_compile` only the fused cross-entropy is kept: it sits outside the compiled decoder layers, and
    inductor fuses the norms, RoPE and SwiGLU inside them itself (dynamo cannot trace Liger's RMSNorm).
    Applied to the base model before LoRA wraps it."""
    parts = config.liger_parts
    if not parts or (config.kernels == "auto" and not has_cuda()):
        return ()
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen3_vl
    except ImportError:
        if config.kernels != "auto":
            raise ImportError(f"kernels: {config.kernels} needs the liger-kernel package (pip install liger-kernel)") \
                from None
        return ()
    if type(model).__name__ != "Qwen3VLForConditionalGeneration":
        return ()
    if config.torch_compile:
        parts = tuple(p for p in parts if p == "fused_linear_cross_entropy")
    if config.fsdp:  # the fused loss reads lm_head's weight without calling the module: FSDP would not gather it
        parts = tuple(p for p in parts if p != "fused_linear_cross_entropy")
    apply_liger_kernel_to_qwen3_vl(rope="rope" in parts, rms_norm="rms_norm" in parts,
                                   fused_linear_cross_entropy="fused_linear_cross_entropy" in parts, model=model)
    if "swiglu" in parts:
        # Liger's Qwen3-VL patch ignores swiglu; bind its fused SiLU*mul forward to each loaded MLP (the
        # gate/up/down projections stay the model's own modules, so LoRA still wraps them).
        from types import MethodType

        from liger_kernel.transformers.swiglu import LigerSwiGLUMLP

        for layer in decoder_layers(model):
            if getattr(layer.mlp.config, "hidden_act", None) in ("silu", "swish"):
                layer.mlp.forward = MethodType(LigerSwiGLUMLP.forward, layer.mlp)
    if parts:
        print(f"kernels: Liger {', '.join(parts)} applied")
    return parts


def compile_layers(model, mode: str = "default") -> int:
    """Regional torch.compile: each language decoder layer and vision block is compiled in place (identical
    layers share one graph, so compiling is quick and the loss and lm_head stay eager); returns the count."""
    layers = decoder_layers(model) + vision_blocks(model)
    for layer in layers:
        layer.compile(mode=mode)
    print(f"torch.compile ({mode}): {len(layers)} layers compiled regionally")
    return len(layers)


def apply_speedups(peft_model, config: TrainConfig) -> Speedups:
    """Regional compile and CUDA graphs on the LoRA-wrapped model, as configured."""
    done = Speedups()
    if config.torch_compile:
        done.compiled_layers = compile_layers(peft_model, config.compile_mode)
    if config.cuda_graphs:
        from trainer.graphs import graph_layers

        checkpoint = 0
        if config.gradient_checkpointing:
            from trainer.layers import decoder_layers

            checkpoint = config.checkpoint_layers or len(decoder_layers(peft_model))
        done.graphs = graph_layers(peft_model, config.cuda_graph_shapes, checkpoint)
    return done


@contextmanager
def training_speedups(model, config: TrainConfig, autocast: bool):
    """While the Trainer runs under autocast (bf16 mixed precision), peft's cast of each adapted layer's bf16
    input to the fp32 adapter dtype is skipped: autocast casts it back to bf16 for the matmul anyway, so the
    result is the same and two copies per layer and step go. Outside training (e.g. the generation eval) the
    casts come back. (Garbage collection between steps is gc_callback's, a Trainer callback.)"""
    from peft.helpers import disable_input_dtype_casting

    with disable_input_dtype_casting(model, active=autocast and not config.lora_input_cast):
        yield


def gc_callback(config: TrainConfig):
    """A TrainerCallback collecting garbage every `gc_every` steps with automatic collection off (a full
    collection over the autograd graph's many objects otherwise lands inside a step); None when 0."""
    if not config.gc_every:
        return None
    from transformers import TrainerCallback

    every = config.gc_every

    class GcEverySteps(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            gc.collect()
            gc.disable()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step % every == 0:
                gc.collect(1)

        def on_train_end(self, args, state, control, **kw):
            gc.enable()

    return GcEverySteps()

"""CUDA graphs for the language model's decoder layers during training (`cuda_graphs: true`).

A LoRA step on a 7-9B model launches thousands of small kernels (each adapted projection adds two matmuls and
their backward, plus norms, RoPE, casts); on a fast GPU the CPU cannot issue them as fast as the GPU runs them,
and the GPU idles most of the step. Here every decoder layer's forward and backward is captured once per batch
shape with `torch.cuda.make_graphed_callables` and then replayed: one launch per layer and direction instead of
hundreds. The layers run the same kernels on the same inputs, so the loss and the gradients are those of the
eager step.

All layers of one shape are captured together, in the order a training step runs them (forward 0..N-1, then
backward N-1..0), into one memory pool, which therefore holds one step's activations for as long as the shape
is kept. Calls that do not fit a capture run the layer eagerly: evaluation and generation (no grad, a KV
cache), a shape beyond `max_shapes`, unexpected keyword arguments (e.g. flash-attention's packed-sequence
lengths), a different requires-grad pattern. Shapes are few when batches are padded to fixed lengths
(`pad_to_multiple_of`).
"""

from __future__ import annotations

import logging
import time
from types import MethodType

logger = logging.getLogger("vlora.trainer")

# Keyword arguments a decoder layer is handed that the SDPA/eager attention ignores (the Trainer's loss
# normaliser travels down the whole model as a keyword argument).
IGNORED_KWARGS = frozenset({"num_items_in_batch", "output_attentions", "output_hidden_states", "return_dict"})


def _sig(t):
    return None if t is None else (tuple(t.shape), t.dtype, t.device)


def _layer_call(layer, has_mask: bool, has_pos: bool):
    """A Module calling one decoder layer with positional tensors only (what make_graphed_callables takes);
    the layer is its submodule so that the capture sees the layer's parameters. It is not attached to the
    model, so the model's parameter names (and the saved adapter) are unchanged."""
    import torch

    class LayerCall(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, hidden, cos, sin, *extra):
            mask = extra[0] if has_mask else None
            pos = extra[-1] if has_pos else None
            return type(self.layer).forward(self.layer, hidden, (cos, sin), attention_mask=mask, position_ids=pos)

    return LayerCall()


class LayerGraphs:
    """Replaces each decoder layer's `forward` with a dispatcher that replays captured graphs when it can."""

    def __init__(self, layers, max_shapes: int = 4):
        self.layers = list(layers)
        self.max_shapes = max_shapes
        self.sets: dict[tuple, dict] = {}  # shape key -> {"calls": [...], "grad": [...]}
        self.replays = 0
        self.eager = 0
        self.capture_seconds = 0.0
        self._told: set[str] = set()
        for i, layer in enumerate(self.layers):
            layer.forward = MethodType(self._dispatcher(i), layer)

    # -- bookkeeping -------------------------------------------------------------------------------------
    def stats(self) -> dict:
        return {"shapes": len(self.sets), "replays": self.replays, "eager_calls": self.eager,
                "capture_seconds": round(self.capture_seconds, 2)}

    def _tell(self, why: str) -> None:
        if why not in self._told:
            self._told.add(why)
            logger.info("cuda graphs: running a decoder layer eagerly: %s", why)
            print(f"cuda graphs: running a decoder layer eagerly: {why}", flush=True)

    @staticmethod
    def _key(hidden, cos, sin, mask, pos) -> tuple:
        import torch

        autocast = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        return _sig(hidden)[:2], _sig(cos), _sig(sin), _sig(mask), _sig(pos), autocast

    # -- dispatch ----------------------------------------------------------------------------------------
    def _dispatcher(self, index: int):
        graphs = self

        def forward(layer, hidden_states, position_embeddings=None, attention_mask=None, position_ids=None,
                    past_key_values=None, use_cache=False, **kwargs):
            def eager():
                graphs.eager += 1
                return type(layer).forward(layer, hidden_states, position_embeddings, attention_mask=attention_mask,
                                           position_ids=position_ids, past_key_values=past_key_values,
                                           use_cache=use_cache, **kwargs)

            why = graphs._ineligible(layer, hidden_states, position_embeddings, past_key_values, kwargs)
            if why:
                if why != "not training":
                    graphs._tell(why)
                return eager()
            cos, sin = position_embeddings
            key = graphs._key(hidden_states, cos, sin, attention_mask, position_ids)
            entry = graphs.sets.get(key)
            if entry is None:
                if index != 0:
                    graphs._tell("a batch shape first seen past the first layer")
                    return eager()
                if len(graphs.sets) >= graphs.max_shapes:
                    graphs._tell(f"more than {graphs.max_shapes} batch shapes (pad batches to fixed lengths)")
                    return eager()
                entry = graphs._capture(key, hidden_states, cos, sin, attention_mask, position_ids)
                if entry is None:
                    return eager()
            if hidden_states.requires_grad != entry["grad"][index]:
                graphs._tell("an input whose requires-grad differs from the captured one")
                return eager()
            extra = tuple(t for t in (attention_mask, position_ids) if t is not None)
            graphs.replays += 1
            return entry["calls"][index](hidden_states, cos, sin, *extra)

        return forward

    @staticmethod
    def _ineligible(layer, hidden, position_embeddings, past_key_values, kwargs) -> str:
        import torch

        if not (layer.training and torch.is_grad_enabled()):
            return "not training"
        if not hidden.is_cuda:
            return "not on a CUDA device"
        if past_key_values is not None:
            return "a KV cache is passed (use_cache)"
        if not (isinstance(position_embeddings, tuple) and len(position_embeddings) == 2):
            return "no (cos, sin) position embeddings"
        unknown = sorted(k for k, v in kwargs.items() if v is not None and k not in IGNORED_KWARGS)
        if unknown:
            return f"keyword arguments {', '.join(unknown)}"
        return ""

    # -- capture -----------------------------------------------------------------------------------------
    def _capture(self, key, hidden, cos, sin, mask, pos) -> dict | None:
        import torch

        started = time.perf_counter()
        grad = [hidden.requires_grad]
        for layer in self.layers[:-1]:
            grad.append(grad[-1] or any(p.requires_grad for p in layer.parameters()))
        statics = tuple(t.detach() for t in (cos, sin, mask, pos) if t is not None)
        calls, samples = [], []
        for layer, needs_grad in zip(self.layers, grad, strict=True):
            calls.append(_layer_call(layer, mask is not None, pos is not None))
            samples.append((hidden.detach().clone().requires_grad_(needs_grad), *statics))
        enabled, dtype = key[-1]
        # make_graphed_callables refuses autocast's weight cache; the captured kernels are the same without it.
        try:
            with torch.autocast("cuda", dtype=dtype, enabled=enabled, cache_enabled=False):
                graphed = torch.cuda.make_graphed_callables(tuple(calls), tuple(samples), allow_unused_input=True)
        except RuntimeError as exc:  # something in the layer cannot be captured: train on, eagerly
            self.max_shapes = 0
            logger.warning("cuda graphs: capture failed, decoder layers run eagerly: %s", exc)
            print(f"cuda graphs: capture failed, decoder layers run eagerly: {exc}", flush=True)
            return None
        entry = {"calls": list(graphed), "grad": grad}
        self.sets[key] = entry
        seconds = time.perf_counter() - started
        self.capture_seconds += seconds
        print(f"cuda graphs: {len(calls)} decoder layers captured for hidden states {tuple(hidden.shape)} in "
              f"{seconds:.1f}s ({len(self.sets)} of at most {self.max_shapes} shapes)", flush=True)
        return entry


def decoder_layers(model) -> list:
    """The language model's decoder layers of a (peft-wrapped) Qwen3-VL-style model, or []."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", base)
    return list(getattr(getattr(inner, "language_model", None), "layers", []))


def graph_layers(model, max_shapes: int = 4) -> LayerGraphs | None:
    """Install the dispatcher on every decoder layer (CUDA only; None otherwise). The text model stops
    building a KV cache in training forwards (generation still asks for one explicitly)."""
    import torch

    layers = decoder_layers(model)
    if not layers:
        raise ValueError("cuda_graphs: the model has no language_model.layers to capture")
    if not torch.cuda.is_available():
        print("cuda graphs: no CUDA device; decoder layers run eagerly", flush=True)
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for cfg in (getattr(base, "config", None), getattr(getattr(base, "config", None), "text_config", None)):
        if cfg is not None and hasattr(cfg, "use_cache"):
            cfg.use_cache = False
    graphs = LayerGraphs(layers, max_shapes)
    model.vlora_graphs = graphs
    print(f"cuda graphs: {len(layers)} decoder layers will be captured per batch shape", flush=True)
    return graphs

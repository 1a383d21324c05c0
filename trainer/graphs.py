"""CUDA graphs for the language model's decoder layers during training (`cuda_graphs: true`).

A LoRA step on a 7-9B model launches thousands of small kernels (each adapted projection adds two matmuls and
their backward, plus norms, RoPE, casts); on a fast GPU the CPU cannot issue them as fast as the GPU runs them,
and the GPU idles most of the step. Here every decoder layer's forward and backward is captured once per batch
shape (after `torch.cuda.make_graphed_callables`) and then replayed: one launch per layer and direction instead of
hundreds. The layers run the same kernels on the same inputs, so the loss and the gradients are those of the
eager step.

All layers of one shape are captured together, in the order a training step runs them (forward 0..N-1, then
backward N-1..0), into one memory pool, which therefore holds one step's activations for as long as the shape
is kept. Calls that do not fit a capture run the layer eagerly: evaluation and generation (no grad, a KV
cache), a shape beyond `max_shapes`, unexpected keyword arguments (e.g. flash-attention's packed-sequence
lengths), a different requires-grad pattern. Shapes are few when batches are padded to fixed lengths
(`pad_to_multiple_of`) or rows are packed (one shape).

With gradient checkpointing the checkpoint is taken inside the capture (torch's non-reentrant checkpoint around
the layer): the forward graph keeps only the layer's input, and the backward graph recomputes the layer and
runs its backward, so the pool holds one layer's activations at a time instead of a step's. (Checkpointing
around a replay, transformers' own per-layer wrapper, would save nothing: a capture's memory is static.) Each
layer's captured input is the previous layer's captured output, and each backward's incoming gradient the
next layer's captured input gradient, so consecutive layers hand tensors on without copies or extra buffers.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from functools import partial
from types import MethodType, SimpleNamespace

from trainer.layers import base_of, decoder_layers

logger = logging.getLogger("vlora.trainer")

# Keyword arguments a decoder layer is handed that the SDPA/eager attention ignores (the Trainer's loss
# normaliser travels down the whole model as a keyword argument).
IGNORED_KWARGS = frozenset({"num_items_in_batch", "output_attentions", "output_hidden_states", "return_dict"})


def _sig(t):
    return None if t is None else (tuple(t.shape), t.dtype, t.device)


@contextmanager
def _swapped(layer, tensors: dict):
    """Temporarily let `layer` compute with `tensors` in place of its parameters of those names."""
    saved = []
    for name, tensor in tensors.items():
        owner, _, leaf = name.rpartition(".")
        module = layer.get_submodule(owner) if owner else layer
        saved.append((module, leaf, module._parameters[leaf]))
        module._parameters[leaf] = tensor
    try:
        yield
    finally:
        for module, leaf, param in saved:
            module._parameters[leaf] = param


class _Captured:
    """One layer's forward and backward graphs and their static tensors."""

    def __init__(self, layer, has_mask: bool, has_pos: bool, checkpoint: bool = False):
        self.layer, self.has_mask, self.has_pos, self.checkpoint = layer, has_mask, has_pos, checkpoint
        named = [(n, p) for n, p in layer.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        # Capture-time stand-ins sharing each trainable parameter's storage: the graphs read the live values
        # (optimizers update parameters in place), while the parameters' own gradient accumulators, which
        # DDP holds and hooks, are never touched inside a capture (a capture stream may not wait on them).
        self.proxies = {n: p.detach().requires_grad_(True) for n, p in named}
        self.fwd = self.bwd = None
        self.args = self.out = self.grad_out = None
        self.grads: list = []

    def _forward(self, hidden, cos, sin, mask, pos):
        with _swapped(self.layer, self.proxies):
            return type(self.layer).forward(self.layer, hidden, (cos, sin), attention_mask=mask, position_ids=pos)

    def run(self, hidden, cos, sin, *extra):
        import torch

        mask = extra[0] if self.has_mask else None
        pos = extra[-1] if self.has_pos else None
        if self.checkpoint and torch.is_grad_enabled():
            # The recompute swaps the stand-ins in again, so gradients still reach them. No RNG state is kept
            # (a capture cannot restore one): the config refuses LoRA dropout with this combination.
            return _checkpoint(self._forward, hidden, cos, sin, mask, pos, preserve_rng_state=False)
        return self._forward(hidden, cos, sin, mask, pos)

    def grad_inputs(self) -> list:
        return [a for a in self.args if a.requires_grad] + list(self.proxies.values())


def _checkpoint(fn, *args, preserve_rng_state: bool = True):
    from torch.utils.checkpoint import checkpoint

    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=preserve_rng_state)


def _same(a, b) -> bool:
    return a is not None and b is not None and a.shape == b.shape and a.dtype == b.dtype and a.device == b.device


def _capture_layers(captured: list[_Captured], samples: list[tuple], warmup: int = 2) -> None:
    """Capture every layer's forward in order, then every backward in reverse order, into one memory pool
    (the order a training step runs them, so no replay overwrites memory another still needs). After
    torch.cuda.make_graphed_callables, with the stand-in parameters described in _Captured."""
    import torch

    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # lazy initialisation (cuBLAS handles, Triton compiles) outside the captures
        for c, args in zip(captured, samples, strict=True):
            c.args = args
            for _ in range(warmup):
                out = c.run(*args)
                if out.requires_grad:
                    torch.autograd.grad(out, c.grad_inputs(), torch.empty_like(out), allow_unused=True)
            del out
    torch.cuda.synchronize()
    pool = torch.cuda.graph_pool_handle()
    for i, c in enumerate(captured):
        c.fwd = torch.cuda.CUDAGraph()
        with torch.cuda.graph(c.fwd, pool=pool):
            c.out = c.run(*c.args)
        if i + 1 < len(captured) and _same(captured[i + 1].args[0], c.out):  # the next layer reads this output
            following = captured[i + 1]
            following.args = (c.out.detach().requires_grad_(following.args[0].requires_grad), *following.args[1:])
    later = None
    # Input gradients go to two buffers in turn: layer i's is read by layer i-1's backward, which runs before
    # layer i-2's overwrites it (a step's backward runs the layers in that order), so two suffice for all layers.
    handoff = [torch.empty_like(captured[-1].out), torch.empty_like(captured[-1].out)]
    for n, c in enumerate(reversed(captured)):
        if not c.out.requires_grad:
            continue
        # the gradient this layer receives is (usually the very tensor) the next layer's input gradient
        handed = later.grads[0] if later is not None and later.grads else None
        c.grad_out = handed if _same(handed, c.out) else torch.empty_like(c.out)
        later = c
        inputs = c.grad_inputs()
        c.bwd = torch.cuda.CUDAGraph()
        with torch.cuda.graph(c.bwd, pool=pool):
            grads = list(torch.autograd.grad(c.out, inputs, c.grad_out, allow_unused=True))
            if c.args[0].requires_grad and _same(grads[0], handoff[0]):
                grads[0] = handoff[n % 2].copy_(grads[0])  # the capture's own buffer goes back to the pool
        it = iter(grads)
        # one slot per user argument (None where it needs no gradient), then one per trainable parameter
        c.grads = [next(it) if a.requires_grad else None for a in c.args] + [next(it) for _ in c.proxies]


def _replay_function():
    import torch

    class Replay(torch.autograd.Function):
        """Forward: copy the inputs into the captured ones, replay. Backward: copy the output gradient in,
        replay, hand out the captured gradients (to the inputs and the real trainable parameters)."""

        @staticmethod
        def forward(ctx, c, *inputs):
            ctx.c = c
            for static, live in zip(c.args, inputs[: len(c.args)], strict=True):
                if static.data_ptr() != live.data_ptr():
                    static.copy_(live)
            c.fwd.replay()
            return c.out.detach()

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, grad):
            c = ctx.c
            if c.grad_out.data_ptr() != grad.data_ptr():
                c.grad_out.copy_(grad)
            c.bwd.replay()
            n = len(c.args)
            # Parameter gradients are cloned: handed out as they are, a gradient accumulator could keep the
            # captured buffer itself as `.grad`, and the next replay (gradient accumulation) would overwrite it.
            return (None, *(g.detach() if g is not None else None for g in c.grads[:n]),
                    *(g.clone() if g is not None else None for g in c.grads[n:]))

    return Replay


class LayerGraphs:
    """Replaces each decoder layer's `forward` with a dispatcher that replays captured graphs when it can."""

    def __init__(self, layers, max_shapes: int = 4, checkpoint: int = 0):
        """`checkpoint`: how many layers, from the first, recompute their activations in the backward (0: none;
        see the module docstring)."""
        self.layers = list(layers)
        self.max_shapes = max_shapes
        self.checkpoint = checkpoint
        self.sets: dict[tuple, dict] = {}  # shape key -> {"calls": [...], "grad": [...]}
        self.replays = 0
        self.eager = 0
        self.capture_seconds = 0.0
        self._told: set[str] = set()
        self._replay = _replay_function()
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
                import torch

                graphs.eager += 1
                call = partial(type(layer).forward, layer, position_embeddings=position_embeddings,
                               attention_mask=attention_mask, position_ids=position_ids,
                               past_key_values=past_key_values, use_cache=use_cache, **kwargs)
                if index < graphs.checkpoint and layer.training and torch.is_grad_enabled() and past_key_values is None:
                    return _checkpoint(call, hidden_states)
                return call(hidden_states)

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
            c = entry["calls"][index]
            if c.bwd is None:  # nothing in or before this layer is trained: forward only
                return graphs._replay.forward(SimpleNamespace(), c, hidden_states, cos, sin, *extra)
            return graphs._replay.apply(c, hidden_states, cos, sin, *extra, *c.params)

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
        calls = [_Captured(layer, mask is not None, pos is not None, checkpoint=i < self.checkpoint)
                 for i, layer in enumerate(self.layers)]
        # Warm-up inputs (their values do not matter): one tensor per requires-grad flag, shared by the layers;
        # each capture after the first reads the previous layer's captured output instead (_capture_layers).
        warm = {g: hidden.detach().clone().requires_grad_(g) for g in set(grad)}
        samples = [(warm[g], *statics) for g in grad]
        enabled, dtype = key[-1]
        # Autocast's weight cache would keep capture-time casts; the captured kernels are the same without it.
        try:
            with torch.autocast("cuda", dtype=dtype, enabled=enabled, cache_enabled=False):
                _capture_layers(calls, samples)
        except RuntimeError as exc:  # something in the layer cannot be captured: train on, eagerly
            self.max_shapes = 0
            logger.warning("cuda graphs: capture failed, decoder layers run eagerly: %s", exc)
            print(f"cuda graphs: capture failed, decoder layers run eagerly: {exc}", flush=True)
            return None
        entry = {"calls": calls, "grad": grad}
        self.sets[key] = entry
        seconds = time.perf_counter() - started
        self.capture_seconds += seconds
        print(f"cuda graphs: {len(calls)} decoder layers captured for hidden states {tuple(hidden.shape)} in "
              f"{seconds:.1f}s ({len(self.sets)} of at most {self.max_shapes} shapes)", flush=True)
        return entry


def graph_layers(model, max_shapes: int = 4, checkpoint: int = 0) -> LayerGraphs | None:
    """Install the dispatcher on every decoder layer (CUDA only; None otherwise). The text model stops
    building a KV cache in training forwards (generation still asks for one explicitly). `checkpoint`: the
    number of layers (from the first) checkpointed inside their captures; transformers' own checkpointing of
    the decoder layers is turned off (it would wrap the replay, see the module docstring)."""
    import torch

    layers = decoder_layers(model)
    if not layers:
        raise ValueError("cuda_graphs: the model has no language_model.layers to capture")
    if not torch.cuda.is_available():
        print("cuda graphs: no CUDA device; decoder layers run eagerly", flush=True)
        return None
    config = getattr(base_of(model), "config", None)
    for cfg in (config, getattr(config, "text_config", None)):
        if cfg is not None and hasattr(cfg, "use_cache"):
            cfg.use_cache = False
    if checkpoint:
        for layer in layers:
            layer.gradient_checkpointing = False
    graphs = LayerGraphs(layers, max_shapes, checkpoint)
    print(f"cuda graphs: {len(layers)} decoder layers will be captured per batch shape"
          + (f", {min(checkpoint, len(layers))} of them checkpointed inside the capture" if checkpoint else ""),
          flush=True)
    return graphs

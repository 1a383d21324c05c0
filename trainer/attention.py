"""`attn_implementation: varlen`: variable-length attention for packed rows, through the FlashAttention-2
kernels that PyTorch itself ships (the kernels behind SDPA's flash backend, `torch.ops.aten._flash_attention_forward`
with cumulative sequence lengths).

Why it is written here: transformers' own variable-length path (`flash_attention_2`) needs the `flash-attn`
package or a kernel fetched from the hub, and without them a packed row goes through SDPA with a
block-diagonal mask. SDPA cannot use its flash kernel with a mask, so it runs the memory-efficient kernel over
the whole row: every query against every key of the row (all its samples and the causal upper half included),
each pair masked one by one. The varlen kernel computes each sample's causal triangle only: a 4096-token row of
~5 samples does a tenth of the attention work.

What it does, per call of a decoder layer's attention:
- on CUDA, with no attention mask (what `packing: true` hands the model: no mask, text positions restarting at 0
  for every sample) and no KV cache: the samples' boundaries are read from the text positions the layer is
  handed (a boundary wherever a position is not its neighbour's plus one: transformers' own packed-sequence
  rule), and the kernel runs over the row's tokens with each sample causal on its own. The boundaries are found
  with fixed-size tensor operations (`nonzero_static` over a bound of `MAX_SAMPLES_PER_ROW` + 1 sequences per
  row, which the packer keeps), so a captured layer (CUDA graphs) replays them for every row;
- the same rows elsewhere (CPU, float32): SDPA with the block-diagonal causal mask built from those boundaries
  (what transformers builds for SDPA from the same positions);
- any other call (a padding mask, a KV cache during generation, the vision tower's bidirectional blocks):
  exactly SDPA, with the masks transformers builds for SDPA.
"""

from __future__ import annotations

from trainer.packing import MAX_SAMPLES_PER_ROW  # the packer's bound on samples per row (+1 for the tail)

NAME = "varlen"


def _cu_seqlens(position_ids, per_row: int):
    """(B, L) text positions -> cumulative sequence starts of shape (B * per_row + 1,), int32: a start wherever
    a position is not the previous one plus one (or a row begins); unused entries point at the end (empty
    sequences, which the kernel skips)."""
    import torch

    rows, length = position_ids.shape
    total = rows * length
    flat = position_ids.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1] + 1
    starts.view(rows, length)[:, 0] = True
    index = torch.nonzero_static(starts, size=rows * per_row, fill_value=total).view(-1)
    end = torch.full((1,), total, dtype=index.dtype, device=index.device)
    return torch.cat([index, end]).to(torch.int32)


def block_causal_mask(position_ids):
    """(B, L) text positions -> (B, 1, L, L) boolean mask: causal within each sample (boundaries as above)."""
    import torch

    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    sample = starts.cumsum(-1)
    length = position_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    return (causal & (sample[:, :, None] == sample[:, None, :]))[:, None]


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers' attention interface: query (B, H, L, D), key/value (B, Hkv, L, D) -> (B, L, H, D), None."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    rows, heads, length, dim = query.shape
    if (attention_mask is not None or position_ids is None or position_ids.ndim != 2 or key.shape[2] != length
            or is_causal is False or not getattr(module, "is_causal", True)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    position_ids = position_ids.expand(rows, -1)
    if not query.is_cuda or query.dtype not in (torch.float16, torch.bfloat16):
        return sdpa_attention_forward(module, query, key, value, block_causal_mask(position_ids), dropout=dropout,
                                      scaling=scaling, is_causal=False, **kwargs)
    cu = _cu_seqlens(position_ids, MAX_SAMPLES_PER_ROW + 1)

    def flat(t):  # (B, H, L, D) -> (B * L, H, D)
        return t.transpose(1, 2).reshape(rows * length, t.shape[1], dim)

    out = torch.ops.aten._flash_attention_forward(
        flat(query), flat(key), flat(value), cu, cu, length, length, dropout, True, False, scale=scaling)[0]
    return out.view(rows, length, heads, dim), None


def varlen_mask(*, batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, device=None,
                **kwargs):
    """The mask transformers hands the layers: none where the varlen path takes the call (no padding mask, no
    cache offset: causality and the packed samples come from the positions), SDPA's elsewhere."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and q_length == kv_length and not q_offset and not kv_offset:
        return None
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, attention_mask=attention_mask, device=device, **kwargs)


def register() -> None:
    """Make `attn_implementation="varlen"` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, varlen_attention_forward)
    AttentionMaskInterface.register(NAME, varlen_mask)

"""Attention over a pack that computes only each example's own causal block.

Given packed position ids, transformers' SDPA path keeps packed examples apart with a dense
(L x L) mask, so a 1024-token pack of 40-token examples computes all of L^2 to keep about 4% of
it. ``packed_sdpa`` splits the pack at the position restarts and runs causal SDPA on each
example: the same outputs, without the masked blocks or the mask, and faster SFT steps on CPU
(bench/README.md, docs/experiments.md). It is the language model's attention for training on
CPU; GPUs have flash-attn's or FlexAttention's block-sparse kernels instead (``kimivl_rl.models.loading``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

PACKED_SDPA = "packed_sdpa"


def example_lengths(position_ids: torch.Tensor) -> list[int]:
    """Lengths of the packed examples in a row of text positions: an example starts wherever
    a position does not follow the one before it (the rule transformers uses too)."""
    row = position_ids.reshape(-1)
    starts = (torch.nonzero(row[1:] != row[:-1] + 1).flatten() + 1).tolist()
    bounds = [0, *starts, row.numel()]
    return [end - start for start, end in zip(bounds, bounds[1:])]


def packed_sdpa_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask, dropout: float = 0.0, scaling=None, position_ids=None,
                          **kwargs) -> tuple[torch.Tensor, None]:
    """(1, heads, L, dim) query/key/value of one pack -> (1, L, heads, dim), each example
    attending causally to itself only. A training kernel: no KV cache, no padding mask."""
    if query.shape[0] != 1 or key.shape[2] != query.shape[2] or position_ids is None:
        raise ValueError(f"{PACKED_SDPA} attends within one pack (batch 1, no KV cache, packed "
                         f"position ids); got query {tuple(query.shape)}, key {tuple(key.shape)}")
    lengths = example_lengths(position_ids)
    grouped = query.shape[1] != key.shape[1]
    blocks = [F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True,
                                             scale=scaling, enable_gqa=grouped)
              for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2),
                                 value.split(lengths, 2))]
    return torch.cat(blocks, dim=2).transpose(1, 2).contiguous(), None


AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)

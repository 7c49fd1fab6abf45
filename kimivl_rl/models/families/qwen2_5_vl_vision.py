"""Qwen2.5-VL's vision attention as one variable-length call per block.

The vision encoder attends within 64-patch windows in most blocks and within each image in the
others (``fullatt_block_indexes``); both arrive as ``cu_seqlens``, the boundaries of those spans
in the encoder's patch sequence. With flash-attn, transformers hands them to its
variable-length kernel; with any other attention it splits the sequence and runs one small SDPA
call per window or image, in a Python loop (and a host sync per block). At 8 images of 1024
patches that is 128 calls per windowed block, and the encoder then takes more than half of a
Qwen2.5-VL-3B training step (bench/README.md, learner_gpu.py --vision-attention).

``use_varlen_vision_attention`` replaces the forward of each vision attention module of one
loaded model (that instance's modules only; nothing in transformers changes) by one that runs
each block's attention as a single call over the whole sequence, each patch attending to the
patches of its own span:

  flex  FlexAttention with a block mask of the spans (compiled; it computes only the blocks
        that hold a span, as flash-attn's variable-length kernel does). Its backward needs a
        GPU.
  sdpa  torch SDPA with a dense boolean block-diagonal mask: computes every (query, key) pair,
        so it costs more than the loop on long sequences; the kernel where FlexAttention cannot
        train (CPU: it has no backward there).

The mask of each set of spans is made once per encoder forward (cached on the ``cu_seqlens``
tensor the encoder passes to all blocks of a kind) rather than once per block. Same
projections, rotary embedding, scaling and output as transformers' module: the same outputs and
gradients as the loop, to float rounding (tests/test_vision_attention.py).
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (Qwen2_5_VLVisionAttention,
                                                                apply_rotary_pos_emb_vision)

KERNELS = ("auto", "flex", "sdpa")
_compiled_flex = None


def use_varlen_vision_attention(model, kernel: str = "auto") -> int:
    """Run each Qwen2.5-VL vision attention module of ``model`` as one variable-length call per
    block; ``kernel`` (module docstring): ``flex``, ``sdpa``, or ``auto`` (flex on CUDA, sdpa
    elsewhere, chosen at each call). Returns how many modules now run it (0: the model has no
    Qwen2.5-VL vision encoder, nothing changed). Call it before wrapping the model (DeepSpeed)
    and before compiling its blocks."""
    if kernel not in KERNELS:
        raise ValueError(f"vision attention kernel {kernel!r}: one of {', '.join(KERNELS)}")
    modules = [m for m in model.modules() if isinstance(m, Qwen2_5_VLVisionAttention)]
    masks = SpanMasks()  # shared by the encoder's blocks: one mask per set of spans
    for module in modules:
        if module.attention_dropout:
            raise ValueError("varlen vision attention has no dropout; the module sets "
                             f"{module.attention_dropout}")
        module.span_masks, module.varlen_kernel = masks, kernel
        module.forward = types.MethodType(varlen_forward, module)
    return len(modules)


def uses_varlen_vision_attention(model) -> bool:
    """Whether ``use_varlen_vision_attention`` was applied to ``model``'s vision encoder."""
    return any(getattr(m, "span_masks", None) is not None for m in model.modules()
               if isinstance(m, Qwen2_5_VLVisionAttention))


def compile_vision_blocks(model) -> int:
    """Regional compilation of each vision block that holds a varlen attention module (fused
    RMSNorm, SwiGLU, rotary and residual kernels; the mask lookup stays outside the graph).
    Returns how many blocks were compiled."""
    blocks = [m for m in model.modules() if any(
        getattr(c, "span_masks", None) is not None for c in m.children()
        if isinstance(c, Qwen2_5_VLVisionAttention))]
    for block in blocks:
        block.compile()
    return len(blocks)


def varlen_forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor,
                   position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                   **kwargs) -> torch.Tensor:
    """``Qwen2_5_VLVisionAttention.forward`` with the attention of all spans in one call."""
    length = hidden_states.shape[0]
    query, key, value = (self.qkv(hidden_states).reshape(length, 3, self.num_heads, -1)
                         .permute(1, 0, 2, 3).unbind(0))
    cos, sin = position_embeddings
    query, key = apply_rotary_pos_emb_vision(query, key, cos, sin)
    query, key, value = (t.transpose(0, 1).unsqueeze(0) for t in (query, key, value))
    kernel = self.varlen_kernel
    if kernel == "auto":
        kernel = "flex" if query.is_cuda else "sdpa"
    mask = self.span_masks.get(cu_seqlens, length, kernel)
    if kernel == "flex":
        out = _flex()(query, key, value, block_mask=mask, scale=self.scaling)
    else:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=self.scaling)
    return self.proj(out[0].transpose(0, 1).reshape(length, -1))


def _flex():
    """FlexAttention compiled once (its fused kernel); the plain op inside a compiled block."""
    global _compiled_flex
    if torch.compiler.is_compiling():
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex


def span_ids(cu_seqlens: torch.Tensor, length: int) -> torch.Tensor:
    """(length,) the span of each position, from the span boundaries [0, ..., length]."""
    positions = torch.arange(length, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens, positions, right=True)


class SpanMasks:
    """The attention mask of the spans of the last ``cu_seqlens`` tensors seen: an encoder
    forward passes one tensor to its windowed blocks and another to its full-attention blocks
    (and the same ones again when activation checkpointing recomputes a block)."""

    def __init__(self, size: int = 2):
        self.size, self.entries = size, []  # [(cu_seqlens, kernel, mask)], newest last

    @torch.compiler.disable
    def get(self, cu_seqlens: torch.Tensor, length: int, kernel: str):
        for i, (cached, cached_kernel, mask) in enumerate(self.entries):
            if cached is cu_seqlens and cached_kernel == kernel:
                self.entries.append(self.entries.pop(i))
                return mask
        mask = self.build(cu_seqlens, length, kernel)
        # The tensor is kept, so no other tensor can take its identity while it is cached.
        self.entries = [*self.entries[-(self.size - 1):], (cu_seqlens, kernel, mask)]
        return mask

    @staticmethod
    def build(cu_seqlens: torch.Tensor, length: int, kernel: str):
        ids = span_ids(cu_seqlens, length)
        if kernel == "sdpa":
            return ids[:, None] == ids[None, :]

        def same_span(batch, head, q, kv):
            return ids[q] == ids[kv]
        return create_block_mask(same_span, None, None, length, length, device=ids.device)

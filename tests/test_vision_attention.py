"""Qwen2.5-VL's vision encoder with one variable-length attention call per block
(``kimivl_rl.models.families.qwen2_5_vl_vision``) against transformers' loop over windows and images:
the same outputs and gradients, to float32 rounding."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import Qwen2_5_VLConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel)

from kimivl_rl.models.families.qwen2_5_vl_vision import (SpanMasks, span_ids,
                                               use_varlen_vision_attention,
                                               uses_varlen_vision_attention)

# Windows of 8x8 patches (112 pixels); blocks 0 and 2 attend within windows, block 1 within
# each image. Neither image is a whole number of windows, so windows differ in size too.
VISION = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=48,
              fullatt_block_indexes=[1], patch_size=14, spatial_merge_size=2,
              temporal_patch_size=2, window_size=112)
GRIDS = torch.tensor([[1, 12, 20], [1, 6, 10]])  # 240 and 60 patches


def encoder_pair(device: str = "cpu", dtype=torch.float32):
    """(the loop, the same weights with varlen attention), both sdpa in transformers' terms."""
    config = Qwen2_5_VLConfig(vision_config=VISION).vision_config
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    loop = Qwen2_5_VisionTransformerPretrainedModel._from_config(config).to(device, dtype)
    varlen = copy.deepcopy(loop)
    return loop, varlen


def pixels(device: str = "cpu", dtype=torch.float32) -> torch.Tensor:
    torch.manual_seed(1)
    dim = 3 * VISION["temporal_patch_size"] * VISION["patch_size"] ** 2
    return torch.randn(int(GRIDS.prod(-1).sum()), dim, device=device, dtype=dtype)


def run(encoder, pixel_values: torch.Tensor, grad: bool = True):
    """(merged output, last hidden state, gradients of the pixels and every parameter) of a
    loss that weighs every output differently."""
    pixel_values = pixel_values.clone().requires_grad_(grad)
    out = encoder(pixel_values, grid_thw=GRIDS.to(pixel_values.device))
    merged, hidden = out.pooler_output, out.last_hidden_state
    if not grad:
        return merged, hidden, []
    torch.manual_seed(2)
    weights = torch.randn_like(merged)
    loss = (merged * weights).sum() + hidden.square().mean()
    params = [p for p in encoder.parameters()]
    grads = torch.autograd.grad(loss, [pixel_values, *params])
    return merged.detach(), hidden.detach(), list(grads)


def assert_close(got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    """Equal within ``rtol`` of the larger magnitude (float32 rounding through a few blocks)."""
    scale = want.abs().max().item()
    error = (got.float() - want.float()).abs().max().item()
    assert error <= rtol * scale + 1e-30, f"max error {error:.3g} against max magnitude {scale:.3g}"


def assert_same_run(got, want, rtol: float) -> None:
    for a, b in zip(got[:2], want[:2]):
        assert_close(a, b, rtol)
    assert len(got[2]) == len(want[2])
    for a, b in zip(got[2], want[2]):
        assert_close(a, b, rtol)


def test_span_ids_follow_boundaries():
    cu = torch.tensor([0, 3, 3, 7, 8], dtype=torch.int32)
    assert span_ids(cu, 8).tolist() == [1, 1, 1, 3, 3, 3, 3, 4]


def test_sdpa_kernel_matches_loop_outputs_and_gradients():
    loop, varlen = encoder_pair()
    assert use_varlen_vision_attention(varlen, kernel="sdpa") == VISION["depth"]
    assert uses_varlen_vision_attention(varlen) and not uses_varlen_vision_attention(loop)
    assert_same_run(run(varlen, pixels()), run(loop, pixels()), rtol=1e-5)


def test_flex_kernel_matches_loop_forward_on_cpu():
    """FlexAttention's CPU kernel has no backward; its gradients are checked on CUDA below."""
    loop, varlen = encoder_pair()
    use_varlen_vision_attention(varlen, kernel="flex")
    with torch.no_grad():
        assert_same_run(run(varlen, pixels(), grad=False), run(loop, pixels(), grad=False),
                        rtol=1e-5)


def test_one_mask_per_set_of_spans_per_forward():
    _, varlen = encoder_pair()
    use_varlen_vision_attention(varlen, kernel="sdpa")
    masks = {m.span_masks for m in varlen.modules() if hasattr(m, "span_masks")}
    assert len(masks) == 1
    masks = masks.pop()
    built = []
    build = masks.build
    masks.build = lambda *args: built.append(args[1]) or build(*args)
    with torch.no_grad():
        run(varlen, pixels(), grad=False)
        run(varlen, pixels(), grad=False)
    assert len(built) == 4  # windows and images, in each of two forwards (3 blocks each)


def test_cache_is_keyed_by_tensor_identity():
    masks = SpanMasks()
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    first = masks.get(cu, 5, "sdpa")
    assert masks.get(cu, 5, "sdpa") is first
    assert masks.get(cu.clone(), 5, "sdpa") is not first
    assert torch.equal(masks.get(cu.clone(), 5, "sdpa"), first)


def test_models_without_qwen2_5_vl_vision_are_left_alone():
    assert use_varlen_vision_attention(torch.nn.Linear(2, 2)) == 0
    with pytest.raises(ValueError, match="one of"):
        use_varlen_vision_attention(torch.nn.Linear(2, 2), kernel="flash")


def test_loader_installs_it_with_flex_attention_only():
    from transformers import Qwen2_5_VLForConditionalGeneration

    from kimivl_rl.models.loading import _vision_attention

    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=dict(VISION, depth=1))
    for attention, installed in (("sdpa", False), ("packed_sdpa in the language model", False),
                                 ("flex_attention in the language model, sdpa in the vision "
                                  "encoder", True)):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config)
        described = _vision_attention(model, attention)
        assert uses_varlen_vision_attention(model) == installed
        assert ("one FlexAttention call per block" in described) == installed

"""Kimi-VL (``kimi_vl``: Kimi-VL-A3B-Instruct, -Thinking, -Thinking-2506): MoonViT at native
resolution (14-pixel patches merged 2x2, 2-D rotary positions), a projector, and a
DeepSeek-V3-architecture language model with plain 1-D positions.

transformers has no Kimi-VL class and the published checkpoints' own code is never run: the
learner's model, processor and tokenizer are kimivl-rl's (``kimi_vl_model``,
``kimi_vl_processing``, ``kimi_vl_tokenizer``), registered with transformers' Auto classes under
the published names before anything loads one. vLLM 0.32 samples it with its native ``KimiVLForConditionalGeneration``, whose processing
asks transformers for that processor. Weights leave in the published layout.
"""
from __future__ import annotations

from kimivl_rl.models.families.base import ModelFamily


class KimiVL(ModelFamily):
    name = "kimi_vl"
    model_types = ("kimi_vl",)
    vision_prefixes = ("model.vision_tower.",)
    projector_prefixes = ("model.multi_modal_projector.",)
    placeholder_tokens = ("<|media_start|>", "<|media_content|>", "<|media_end|>", "<|media_pad|>")
    image_markup = "<|media_start|>image<|media_content|><|media_pad|><|media_end|>"
    pixels_per_vision_token = 28 * 28
    uses_mla = True                   # its language model is DeepSeek-V3's
    image_markers = 5                 # start, "image" (2 tokens in the tiny tokenizer), content, end
    vllm_image_field = "image"
    # The release the oracle test (tests/test_family_parity.py) ran on; not tried on older ones.
    vllm_min_version = (0, 32)

    @classmethod
    def placeholder_id(cls, model_config) -> int:
        return model_config.media_placeholder_token_id

    @classmethod
    def register_classes(cls) -> None:
        from kimivl_rl.models.families.kimi_vl_processing import register as register_processor
        from kimivl_rl.models.families.kimi_vl_tokenizer import register as register_tokenizer

        register_processor()
        register_tokenizer()

    def encode_images(self, processor, images: list):
        """Patches in the model's dtype, and each image's (1, rows, columns) patch grid: the
        processor's ``image_grid_hws`` in the (images, 3) form packing gives every family."""
        import torch

        vision = processor.image_processor(images=images, return_tensors="pt")
        grid = vision["image_grid_hws"]
        return vision["pixel_values"].to(self.model.dtype), torch.cat([torch.ones_like(grid[:, :1]), grid], 1)

    def vision_token_counts(self, processor, grid) -> list[int]:
        merge = processor.image_processor.merge_kernel_size
        return [int(g.prod()) // (merge[0] * merge[1]) for g in grid]

    @classmethod
    def tiny_parts(cls):
        import kimivl_rl.models.families.kimi_vl_tiny as parts  # loads transformers' model code

        return parts

    def checkpoint_layout(self, state: dict) -> dict:
        from transformers.core_model_loading import revert_weight_conversion

        return revert_weight_conversion(self.model, dict(state))

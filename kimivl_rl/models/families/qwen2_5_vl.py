"""Qwen2.5-VL (and the tiny model built in its image): 14-pixel patches merged 2x2 into one
vision token, multimodal rotary positions (mrope) over time, height and width, and the vision
encoder at ``model.visual``."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from kimivl_rl.models.families.base import ModelFamily, inner_model

if TYPE_CHECKING:
    import torch


class Qwen25VL(ModelFamily):
    name = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    vision_prefixes = ("model.visual.patch_embed", "model.visual.blocks")
    projector_prefixes = ("model.visual.merger",)
    placeholder_tokens = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
    image_markup = "<|vision_start|><|image_pad|><|vision_end|>"
    pixels_per_vision_token = 28 * 28
    image_markers = 2                 # <|vision_start|> and <|vision_end|>
    vllm_image_field = "image"

    def positions(self, input_ids: torch.Tensor, grid: Optional[torch.Tensor]) -> torch.Tensor:
        """(4, L): text positions, then the 3 mrope rows (equal to the text row without images)."""
        import torch

        length = input_ids.shape[0]
        text = torch.arange(length)
        if grid is None:
            return text.expand(4, length).clone()
        mm_types = (input_ids == self.image_token_id).int()[None]
        with torch.no_grad():
            rope, _ = inner_model(self.model).get_rope_index(
                input_ids[None], mm_token_type_ids=mm_types, image_grid_thw=grid)
        return torch.cat([text[None], rope[:, 0]], dim=0)

    def batch_inputs(self, input_ids: torch.Tensor, positions: torch.Tensor) -> dict:
        return {"position_ids": positions[:, None],
                "mm_token_type_ids": (input_ids == self.image_token_id).int()}

    @classmethod
    def tiny_parts(cls):
        import kimivl_rl.models.families.qwen2_5_vl_tiny as parts  # loads transformers' model code

        return parts

    def use_fused_vision_attention(self) -> bool:
        # Imported here: it loads transformers' model code, which config checks do not need.
        from kimivl_rl.models.families.qwen2_5_vl_vision import use_varlen_vision_attention

        return use_varlen_vision_attention(self.model) > 0

    def compile_vision_blocks(self) -> None:
        from kimivl_rl.models.families.qwen2_5_vl_vision import compile_vision_blocks

        # The loop over windows would break the graph at every window: only fused blocks.
        compile_vision_blocks(self.model)

    @classmethod
    def vllm_image_limits(cls, max_images: int) -> dict[str, int]:
        return {"image": max_images, "video": 0}

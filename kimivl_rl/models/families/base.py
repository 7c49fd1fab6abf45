"""What differs between vision-language architectures, behind one small interface.

Everything outside ``kimivl_rl.models.families`` speaks of images, vision tokens, positions and
parameter groups through a ``ModelFamily``; one module per family implements it. Families are
read without torch (the CLI, ``config check``): methods that compute import it themselves.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    import torch


class ModelFamily(ABC):
    """One architecture family: how its processor turns images into model inputs, how many
    tokens an image becomes, its positions, its parameter groups and its special tokens.
    Class attributes need no model (``config check`` reads them); an instance is bound to one
    loaded model (``family_of``)."""

    name: str = ""
    model_types: tuple[str, ...] = ()          # Hugging Face ``model_type`` values it handles
    vision_prefixes: tuple[str, ...] = ()      # vision-encoder parameters (sft.freeze_vision)
    projector_prefixes: tuple[str, ...] = ()   # vision-to-language projector (sft.freeze_projector)
    placeholder_tokens: tuple[str, ...] = ()   # media tokens: never valid output
    image_markup: str = ""                     # what the chat template writes for one image
    pixels_per_vision_token: int = 28 * 28     # before the image's markers
    image_markers: int = 2                     # tokens around each image's vision tokens
    vllm_image_field: str = "image"            # vLLM's ``multi_modal_data`` key for images
    vllm_in_process: bool = True               # whether vLLM's engine may run in our process
    vllm_min_version: tuple[int, int] = (0, 24)  # the oldest vLLM release that samples it
    uses_mla: bool = False                     # multi-head latent attention (DeepSeek-V3's)

    def __init__(self, model):
        self.model = getattr(model, "module", model)   # through a DeepSpeed wrapper
        self.image_token_id = self.placeholder_id(self.model.config)

    @classmethod
    def placeholder_id(cls, model_config) -> int:
        """The id of the token each vision token of an image replaces."""
        return model_config.image_token_id

    def image_token(self, processor) -> str:
        """The placeholder string the chat template writes once per image."""
        return processor.image_token

    def encode_images(self, processor, images: list) -> tuple[torch.Tensor, torch.Tensor]:
        """(pixel values, per-image patch grid (images, 3)) for the model's forward."""
        vision = processor.image_processor(images=images, return_tensors="pt")
        return vision["pixel_values"], vision["image_grid_thw"]

    def vision_token_counts(self, processor, grid: torch.Tensor) -> list[int]:
        """How many placeholder tokens each image of ``grid`` becomes in the prompt: its
        patches, merged ``merge_size`` x ``merge_size`` into one token."""
        merge = processor.image_processor.merge_size ** 2
        return [int(g.prod()) // merge for g in grid]

    def positions(self, input_ids: torch.Tensor, grid: Optional[torch.Tensor]) -> torch.Tensor:
        """(rows, L) positions of one example, starting from 0. Row 0 is the text position,
        whose restarts tell packed examples apart."""
        import torch

        return torch.arange(input_ids.shape[0])[None]

    def batch_inputs(self, input_ids: torch.Tensor, positions: torch.Tensor) -> dict:
        """Model inputs besides ids and images for one pack: ``input_ids`` (1, T) and the
        examples' positions concatenated, (rows, T)."""
        return {"position_ids": positions}

    @classmethod
    def register_classes(cls) -> None:
        """Make the family's model and processor classes known to transformers' Auto classes
        in this process, where transformers itself has none (no-op by default)."""

    @classmethod
    @abstractmethod
    def tiny_parts(cls):
        """The module that describes this family's tiny model (``kimivl_rl.models.tiny``):
        ``MODEL_CLASS``, ``model_config(spec, tokenizer)``, ``save_processor(tokenizer, dir)``."""

    def checkpoint_layout(self, state: dict) -> dict:
        """The model's weights (``state_dict`` names and tensors) under the names and shapes a
        saved checkpoint of the family uses, which vLLM's loader reads (weight sync)."""
        return state

    @classmethod
    def finish_checkpoint(cls, directory) -> None:
        """Mend what ``save_pretrained`` wrote to ``directory`` where the family needs it."""

    def use_fused_vision_attention(self) -> bool:
        """Run the vision encoder's attention as one call per block where transformers loops
        over windows or images (a GPU without flash-attn); False when the family has no such
        loop to replace."""
        return False

    def compile_vision_blocks(self) -> None:
        """Compile each vision block on its own where its graph allows (no-op by default)."""

    @classmethod
    def vllm_images(cls, images: list) -> dict:
        """vLLM's ``multi_modal_data`` for a prompt's images."""
        return {cls.vllm_image_field: images}

    @classmethod
    def vllm_image_limits(cls, max_images: int) -> dict[str, int]:
        """vLLM's ``limit_mm_per_prompt`` for prompts of at most ``max_images`` images."""
        return {cls.vllm_image_field: max_images}


def inner_model(model):
    """The model under the LM head (``model.model``), also through a DeepSpeed wrapper."""
    model = getattr(model, "module", model)
    return model.model

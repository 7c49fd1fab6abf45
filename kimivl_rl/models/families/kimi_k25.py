"""Kimi K2.5 (``kimi_k25``): a MoonViT-style vision encoder at native resolution (14-pixel
patches, merged 2x2), a projector, and a DeepSeek-V3-style language model (multi-head latent
attention, mixture-of-experts) with plain 1-D rotary positions; in vLLM images go in as
``vision_chunk``.

Weights leave kimivl-rl (saved checkpoints, weight sync to vLLM) under the names of the released
``moonshotai/Kimi-K2.5`` checkpoint, the one layout both transformers and vLLM read:
transformers 5.19 converts its in-memory layout back to it (per-expert weights, checkpoint
prefixes) but gets three prefixes wrong, which ``CHECKPOINT_RENAMES`` mends.
"""
from __future__ import annotations

import json
from pathlib import Path

from kimivl_rl.models.families.base import ModelFamily

CHECKPOINT_RENAMES = [("language_model.model.blocks.", "language_model.model.layers."),
                      ("model.mm_projector.", "mm_projector."),
                      ("vision_tower.encoder.patch_embed.", "vision_tower.patch_embed.")]
# vLLM knows the model by the released checkpoint's class name; with transformers' it falls back
# to its generic Transformers backend, which cannot load it.
VLLM_ARCHITECTURE = "KimiK25ForConditionalGeneration"


def _checkpoint_name(name: str) -> str:
    for old, new in CHECKPOINT_RENAMES:
        name = name.replace(old, new)
    return name


class KimiK25(ModelFamily):
    name = "kimi_k25"
    model_types = ("kimi_k25",)
    vision_prefixes = ("model.vision_tower.",)
    projector_prefixes = ("model.mm_projector.",)
    placeholder_tokens = ("<|media_begin|>", "<|media_content|>", "<|media_end|>", "<|media_pad|>",
                          "<|kimi_k25_video_placeholder|>")
    image_markup = "<|media_begin|>image<|media_content|><|media_pad|><|media_end|>"
    pixels_per_vision_token = 28 * 28
    uses_mla = True                   # its language model is DeepSeek-V3's
    image_markers = 5                 # begin, "image" (2 tokens in the tiny tokenizer), content, end
    vllm_image_field = "vision_chunk"
    # vLLM's Kimi image processor imports numba, after which vLLM's CPU kernel-override scan
    # (triton_utils/dispatcher.py) crashes on llvmlite's library in that process.
    vllm_in_process = False
    # vLLM 0.24's Kimi K2.5 processor asks the image processor for media_tokens_calculator, which
    # transformers' Kimi K2.5 image processor does not have.
    vllm_min_version = (0, 32)

    def encode_images(self, processor, images: list):
        # MoonViT's patch embedding does not cast its input as Qwen2.5-VL's does.
        pixel_values, grid = super().encode_images(processor, images)
        return pixel_values.to(self.model.dtype), grid

    @classmethod
    def vllm_images(cls, images: list) -> dict:
        return {cls.vllm_image_field: [{"type": "image", "image": image} for image in images]}

    @classmethod
    def tiny_parts(cls):
        import kimivl_rl.models.families.kimi_k25_tiny as parts  # loads transformers' model code

        return parts

    def checkpoint_layout(self, state: dict) -> dict:
        from transformers.core_model_loading import revert_weight_conversion

        return {_checkpoint_name(name): tensor
                for name, tensor in revert_weight_conversion(self.model, dict(state)).items()}

    @classmethod
    def finish_checkpoint(cls, directory) -> None:
        from safetensors.torch import load_file, save_file

        directory = Path(directory)
        for shard in directory.glob("*.safetensors"):
            tensors = {_checkpoint_name(n): t.contiguous() for n, t in load_file(shard).items()}
            save_file(tensors, shard, metadata={"format": "pt"})
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            table = json.loads(index.read_text())
            table["weight_map"] = {_checkpoint_name(n): f for n, f in table["weight_map"].items()}
            index.write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
        config_file = directory / "config.json"
        config = json.loads(config_file.read_text())
        config["architectures"] = [VLLM_ARCHITECTURE]
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

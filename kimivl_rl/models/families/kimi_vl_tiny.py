"""The tiny model of the Kimi-VL architecture (``kimivl_rl.models.tiny`` builds it), in the
published checkpoints' layout: ``config.json`` as Kimi-VL-A3B's (``model_type`` kimi_vl, a
``moonvit`` vision config, a DeepSeek-V3 text config without a query low-rank projection, like
the published model), parameter names as vLLM's loader reads them, and the published
``preprocessor_config.json`` naming ``KimiVLProcessor`` and its ``auto_map``, which nothing here
runs. The language model's settings are the tiny Kimi K2.5's (``kimi_k25_tiny``), for the same
reasons (docs/model_families.md).
"""
from __future__ import annotations

import json
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from kimivl_rl.models.families.kimi_k25_tiny import tiny_deepseek_v3_text
from kimivl_rl.models.families.kimi_vl_model import KimiVLConfig, KimiVLForConditionalGeneration
from kimivl_rl.models.families.kimi_vl_processing import KimiVLImageProcessor, KimiVLProcessor

MODEL_CLASS = KimiVLForConditionalGeneration
# The published checkpoints' code files, named where their configs name them; never written, never run.
PUBLISHED_AUTO_MAP = {"AutoImageProcessor": "image_processing_kimi_vl.KimiVLImageProcessor",
                      "AutoProcessor": "processing_kimi_vl.KimiVLProcessor"}
POS_EMB_GRID = 16        # a 112 px image is 8 x 8 patches: its position table is resampled


def model_config(spec, tokenizer: PreTrainedTokenizerFast) -> KimiVLConfig:
    """The architecture of ``spec`` (a ``TinyVLMSpec``)."""
    ids = tokenizer.convert_tokens_to_ids
    text = tiny_deepseek_v3_text(spec, tokenizer, q_lora_rank=None)  # as published: no query low rank
    vision = dict(patch_size=14, init_pos_emb_height=POS_EMB_GRID, init_pos_emb_width=POS_EMB_GRID,
                  num_attention_heads=spec.vision_heads, num_hidden_layers=spec.vision_depth,
                  hidden_size=spec.vision_hidden, intermediate_size=2 * spec.vision_hidden,
                  merge_kernel_size=[2, 2])
    return KimiVLConfig(vision_config=vision, text_config=text,
                        media_placeholder_token_id=ids("<|media_pad|>"),
                        pad_token_id=ids("<|endoftext|>"), architectures=[MODEL_CLASS.__name__])


def save_processor(tokenizer: PreTrainedTokenizerFast, directory: Path) -> None:
    """The tokenizer and chat template, and the image settings as the published
    ``preprocessor_config.json`` holds them."""
    processor = KimiVLProcessor(image_processor=KimiVLImageProcessor(), tokenizer=tokenizer,
                                chat_template=tokenizer.chat_template)
    processor.save_pretrained(directory)
    image = processor.image_processor
    published = {"auto_map": PUBLISHED_AUTO_MAP, "image_processor_type": "KimiVLImageProcessor",
                 "processor_class": "KimiVLProcessor", "patch_size": image.patch_size,
                 "pad_input": image.pad_input, "in_token_limit": image.in_token_limit,
                 "merge_kernel_size": image.merge_kernel_size, "num_pooled_tokens": 1024,
                 "image_mean": image.image_mean, "image_std": image.image_std}
    (directory / "processor_config.json").unlink(missing_ok=True)
    (directory / "preprocessor_config.json").write_text(json.dumps(published, indent=2) + "\n")

"""The tiny model of the Qwen2.5-VL architecture (``kimivl_rl.models.tiny`` builds it): head
size 64 in both towers (vLLM's CPU attention rejects 16), and one 112x112 image makes 16 vision
tokens."""
from __future__ import annotations

from pathlib import Path

from transformers import (PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                          Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor)

MODEL_CLASS = Qwen2_5_VLForConditionalGeneration


def model_config(spec, tokenizer: PreTrainedTokenizerFast) -> Qwen2_5_VLConfig:
    """The architecture of ``spec`` (a ``TinyVLMSpec``)."""
    ids = tokenizer.convert_tokens_to_ids
    head_dim = spec.text_hidden // spec.text_heads
    half = head_dim // 2  # mrope splits half the head's rotary frequencies over t, h, w
    vocab = -(-len(tokenizer) // 64) * 64
    return Qwen2_5_VLConfig(
        vision_config=dict(depth=spec.vision_depth, hidden_size=spec.vision_hidden,
                           num_heads=spec.vision_heads, intermediate_size=2 * spec.vision_hidden,
                           out_hidden_size=spec.text_hidden, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[spec.vision_depth - 1],
                           initializer_range=spec.initializer_range),
        text_config=dict(vocab_size=vocab, hidden_size=spec.text_hidden,
                         intermediate_size=spec.text_intermediate,
                         num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
                         num_key_value_heads=spec.text_heads,
                         max_position_embeddings=spec.max_position_embeddings,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [half // 4, 3 * half // 8, 3 * half // 8]},
                         bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"),
                         pad_token_id=ids("<|endoftext|>"), initializer_range=spec.initializer_range),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False, initializer_range=spec.initializer_range,
    )


def save_processor(tokenizer: PreTrainedTokenizerFast, directory: Path) -> None:
    size = {"shortest_edge": 56 * 56, "longest_edge": 448 * 448}
    Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size, patch_size=14, merge_size=2,
                                              temporal_patch_size=2),
        video_processor=Qwen2VLVideoProcessor(size=size, patch_size=14, merge_size=2,
                                              temporal_patch_size=2),
        tokenizer=tokenizer, chat_template=tokenizer.chat_template).save_pretrained(directory)

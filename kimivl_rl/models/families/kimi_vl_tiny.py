"""The tiny model of the Kimi-VL architecture (``kimivl_rl.models.tiny`` builds it), in the
published checkpoints' layout: ``config.json`` as Kimi-VL-A3B's (``model_type`` kimi_vl, a
``moonvit`` vision config, a DeepSeek-V3 text config without a query low-rank projection, like
the published model), parameter names as vLLM's loader reads them, the published
``preprocessor_config.json`` naming ``KimiVLProcessor`` and its ``auto_map``, which nothing here
runs, and the published tokenizer files: ``tiktoken.model`` (a BPE learnt here with Moonshot's
split) and ``tokenizer_config.json`` naming ``TikTokenTokenizer``, its reserved ids named as
Kimi-VL's are, and Kimi-VL's chat template. The language model's settings are the tiny Kimi
K2.5's (``kimi_k25_tiny``), for the same reasons (docs/model_families.md).
"""
from __future__ import annotations

import base64
import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from kimivl_rl.models.families.kimi_k25_tiny import tiny_deepseek_v3_text
from kimivl_rl.models.families.kimi_vl_model import KimiVLConfig, KimiVLForConditionalGeneration
from kimivl_rl.models.families.kimi_vl_processing import KimiVLImageProcessor, KimiVLProcessor
from kimivl_rl.models.families.kimi_vl_tokenizer import PATTERN, RESERVED_IDS, VOCAB_FILE, TikTokenTokenizer

MODEL_CLASS = KimiVLForConditionalGeneration
# The published checkpoints' code files, named where their configs name them; never written, never run.
PUBLISHED_AUTO_MAP = {"AutoImageProcessor": "image_processing_kimi_vl.KimiVLImageProcessor",
                      "AutoProcessor": "processing_kimi_vl.KimiVLProcessor"}
POS_EMB_GRID = 16        # a 112 px image is 8 x 8 patches: its position table is resampled
# The first reserved ids' names, all special, in Kimi-VL's order; [UNK] and [PAD] take the last two.
RESERVED_NAMES = ("[BOS]", "[EOS]", "<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|im_system|>",
                  "<|im_middle|>", "<|media_start|>", "<|media_content|>", "<|media_end|>", "<|media_pad|>")
# Kimi-VL-A3B's chat template: a default system turn, role markers, "<|im_middle|>" after the
# role's name, each image as its media markup; it renders no reasoning_content (SFT writes it
# into the content: kimivl_rl/sft/encode.py).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and messages[0]['role'] != 'system' -%}"
    "{{- '<|im_system|>system<|im_middle|>You are a helpful assistant<|im_end|>' -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'system' -%}{{- '<|im_system|>' -}}"
    "{%- elif message['role'] == 'user' -%}{{- '<|im_user|>' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- '<|im_assistant|>' -}}{%- endif -%}"
    "{{- message['role'] -}}{{- '<|im_middle|>' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for content in message['content'] -%}"
    "{%- if content['type'] == 'image' or 'image' in content or 'image_url' in content -%}"
    "{{- '<|media_start|>image<|media_content|><|media_pad|><|media_end|>' -}}"
    "{%- else -%}{{- content['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_assistant|>assistant<|im_middle|>' -}}{%- endif -%}"
)


def tokenizer(spec, texts, directory: Path) -> TikTokenTokenizer:
    """A byte-level BPE of ``spec.vocab_size`` ids learnt on ``texts`` with Moonshot's split,
    written to ``directory`` as ``tiktoken.model`` and read back as the published class reads it;
    the thinking markers are named reserved ids, not special, so decoding keeps them."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=spec.vocab_size - RESERVED_IDS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    ranked = sorted(bpe.get_vocab().items(), key=lambda item: item[1])
    (directory / VOCAB_FILE).write_text("".join(
        f"{base64.b64encode(bytes(byte_of[c] for c in token)).decode()} {rank}\n"
        for rank, (token, _) in enumerate(ranked)))
    base, last = len(ranked), len(ranked) + RESERVED_IDS - 1
    named = {**dict.fromkeys(RESERVED_NAMES, True), spec.think_open: False, spec.think_close: False}
    decoder = {**{base + i: AddedToken(name, special=special) for i, (name, special) in enumerate(named.items())},
               last - 1: AddedToken("[UNK]", special=True), last: AddedToken("[PAD]", special=True)}
    return TikTokenTokenizer(vocab_file=str(directory / VOCAB_FILE), added_tokens_decoder=decoder,
                             bos_token="[BOS]", eos_token="<|im_end|>", unk_token="[UNK]",
                             pad_token="[PAD]", chat_template=CHAT_TEMPLATE,
                             model_max_length=spec.max_position_embeddings)


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
                        pad_token_id=tokenizer.pad_token_id, architectures=[MODEL_CLASS.__name__])


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

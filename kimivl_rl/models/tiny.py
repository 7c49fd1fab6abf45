"""Build the tiny vision-language model offline, deterministically from a seed.

The result is an ordinary Hugging Face directory (safetensors weights, config, tokenizer,
processor, chat template) of the Qwen2.5-VL architecture, loadable with
``AutoModelForImageTextToText`` / ``AutoProcessor`` and by vLLM. Sizes keep attention head
size at 64 (vLLM's CPU attention rejects 16) and make one 112x112 image 16 vision tokens.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (GenerationConfig, PreTrainedTokenizerFast, Qwen2_5_VLConfig,
                          Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                          Qwen2VLImageProcessor, Qwen2VLVideoProcessor)

from kimivl_rl.data.build import FORMAT_VERSION, corpus_texts
from kimivl_rl.infra.ownership import check_replaceable_dir, file_hashes, sha256_of, staging_dir

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
BUILD_INFO = "kimivl_tiny.json"


@dataclass(frozen=True)
class TinyVLMSpec:
    seed: int = 0
    think_open: str = "<think>"
    think_close: str = "</think>"
    vocab_size: int = 1024          # BPE merges learnt on the built-in corpus
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 2             # head size 64
    text_intermediate: int = 512
    vision_hidden: int = 128
    vision_depth: int = 2
    vision_heads: int = 2           # head size 64
    max_position_embeddings: int = 4096


def chat_template(think_open: str, think_close: str) -> str:
    """Qwen2-VL style turns; an assistant's ``reasoning_content`` goes in the thinking section."""
    return (
        "{%- for message in messages -%}"
        "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
        "{%- if message['role'] == 'assistant' and message.get('reasoning_content') -%}"
        f"{{{{- '{think_open}' + message['reasoning_content'] + '{think_close}' -}}}}"
        "{%- endif -%}"
        "{%- if message['content'] is string -%}{{- message['content'] -}}"
        "{%- else -%}{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
        "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{{- '<|im_end|>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    )


def _train_tokenizer(spec: TinyVLMSpec) -> PreTrainedTokenizerFast:
    """Byte-level BPE on the built-in corpus; digits are single tokens (arithmetic)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=spec.vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus_texts(spec.seed), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token=None,
                                   model_max_length=spec.max_position_embeddings)
    # Not special: the markers must survive decoding so the reward can find the answer.
    fast.add_tokens([spec.think_open, spec.think_close])
    fast.chat_template = chat_template(spec.think_open, spec.think_close)
    return fast


def _model_config(spec: TinyVLMSpec, tokenizer: PreTrainedTokenizerFast) -> Qwen2_5_VLConfig:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = spec.text_hidden // spec.text_heads
    half = head_dim // 2  # mrope splits half the head's rotary frequencies over t, h, w
    vocab = -(-len(tokenizer) // 64) * 64
    return Qwen2_5_VLConfig(
        vision_config=dict(depth=spec.vision_depth, hidden_size=spec.vision_hidden,
                           num_heads=spec.vision_heads, intermediate_size=2 * spec.vision_hidden,
                           out_hidden_size=spec.text_hidden, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[spec.vision_depth - 1]),
        text_config=dict(vocab_size=vocab, hidden_size=spec.text_hidden,
                         intermediate_size=spec.text_intermediate,
                         num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
                         num_key_value_heads=spec.text_heads,
                         max_position_embeddings=spec.max_position_embeddings,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [half // 4, 3 * half // 8, 3 * half // 8]},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def _processor(tokenizer: PreTrainedTokenizerFast, spec: TinyVLMSpec) -> Qwen2_5_VLProcessor:
    size = {"shortest_edge": 56 * 56, "longest_edge": 448 * 448}
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size, patch_size=14, merge_size=2,
                                              temporal_patch_size=2),
        video_processor=Qwen2VLVideoProcessor(size=size, patch_size=14, merge_size=2,
                                              temporal_patch_size=2),
        tokenizer=tokenizer, chat_template=chat_template(spec.think_open, spec.think_close))


def build_tiny_vlm(out_dir: str | Path, spec: TinyVLMSpec = TinyVLMSpec(),
                   setting: str = "model.path") -> Path:
    """Write the tiny model to ``out_dir``; same spec, same files. An existing ``out_dir`` is
    replaced only when it is empty or a tiny model of ours holding no other file and no changed
    one (its ``kimivl_tiny.json`` lists them); ``setting`` names where the path came from, for
    the refusal."""
    out_dir = Path(out_dir)
    check_replaceable_dir(out_dir, _recorded_files(out_dir), setting,
                          "Choose a new or empty directory.")
    staging = staging_dir(out_dir)
    try:
        _save_model(spec, staging)
        # Swap in the finished model only now, so an interrupted build never looks complete.
        shutil.rmtree(out_dir, ignore_errors=True)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _save_model(spec: TinyVLMSpec, directory: Path) -> None:
    tokenizer = _train_tokenizer(spec)
    config = _model_config(spec, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        eos_token_id=[config.text_config.eos_token_id, config.text_config.pad_token_id],
        pad_token_id=config.text_config.pad_token_id, bos_token_id=config.text_config.bos_token_id)
    model.save_pretrained(directory)
    _processor(tokenizer, spec).save_pretrained(directory)
    info = {**_build_info(spec), "files": file_hashes(directory)}
    (directory / BUILD_INFO).write_text(json.dumps(info, indent=1, sort_keys=True))


def _build_info(spec: TinyVLMSpec) -> dict:
    # The tokenizer is trained on the built-in corpus, so a new data format means a new model.
    return {**asdict(spec), "corpus_format_version": FORMAT_VERSION}


def _read_info(out_dir: Path) -> dict:
    """The build record of a tiny model of ours at ``out_dir``; {} when there is none."""
    try:
        info = json.loads((out_dir / BUILD_INFO).read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _recorded_files(out_dir: Path):
    """The files a build of ours at ``out_dir`` wrote (the record included), with their sha256;
    None when it holds no such record (an older build listed none)."""
    files = _read_info(out_dir).get("files")
    return {**files, BUILD_INFO: sha256_of(out_dir / BUILD_INFO)} if isinstance(files, dict) else None


def tiny_vlm_is_current(out_dir: str | Path, spec: TinyVLMSpec) -> bool:
    info = _read_info(Path(out_dir))
    info.pop("files", None)
    return info == _build_info(spec)

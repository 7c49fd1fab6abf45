"""Build the tiny vision-language model offline, deterministically from a seed.

The result is an ordinary Hugging Face directory (safetensors weights, config, tokenizer,
processor, chat template) of the architecture ``TinyVLMSpec.family`` names (Qwen2.5-VL by
default, or Kimi K2.5), loadable with ``AutoModelForImageTextToText`` / ``AutoProcessor`` and
by vLLM. Each family's module under ``kimivl_rl.models.families`` writes its own model; the
tokenizer, chat template and build record are shared here.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast

from kimivl_rl.infra.ownership import check_replaceable_dir, file_hashes, sha256_of, staging_dir
from kimivl_rl.models.families import DEFAULT_FAMILY, FAMILIES, TINY_BUILD_INFO

TURN_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BUILD_INFO = TINY_BUILD_INFO


@dataclass(frozen=True)
class TokenizerCorpus:
    """The text the tokenizer learns its merges from (``texts(seed)``), and the version of that
    text: the caller owns the data, so a new version means a new model."""
    texts: Callable[[int], Iterable[str]]
    version: int


@dataclass(frozen=True)
class TinyVLMSpec:
    seed: int = 0
    family: str = DEFAULT_FAMILY    # kimivl_rl.models.families
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
    # Larger initial weights and output layer, so next-token distributions are far from
    # uniform: a near-uniform model hides log-probability mismatches between engines.
    peaked: bool = False

    @property
    def initializer_range(self) -> float:
        return 0.1 if self.peaked else 0.02

    @property
    def head_scale(self) -> float:
        """What the output layer's initial weights are multiplied by."""
        return 4.0 if self.peaked else 1.0


def chat_template(think_open: str, think_close: str, image_markup: str) -> str:
    """Qwen2-VL style turns, ``image_markup`` for each image; an assistant's
    ``reasoning_content`` goes in the thinking section."""
    return (
        "{%- for message in messages -%}"
        "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
        "{%- if message['role'] == 'assistant' and message.get('reasoning_content') -%}"
        f"{{{{- '{think_open}' + message['reasoning_content'] + '{think_close}' -}}}}"
        "{%- endif -%}"
        "{%- if message['content'] is string -%}{{- message['content'] -}}"
        "{%- else -%}{%- for part in message['content'] -%}"
        f"{{%- if part['type'] == 'image' -%}}{{{{- '{image_markup}' -}}}}"
        "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{{- '<|im_end|>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    )


def _train_tokenizer(spec: TinyVLMSpec, corpus: TokenizerCorpus) -> PreTrainedTokenizerFast:
    """Byte-level BPE on ``corpus`` with the family's media tokens; digits are single
    tokens (arithmetic)."""
    family = FAMILIES[spec.family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=spec.vocab_size,
                                  special_tokens=TURN_TOKENS + list(family.placeholder_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus.texts(spec.seed), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token=None,
                                   model_max_length=spec.max_position_embeddings)
    # Not special: the markers must survive decoding so the reward can find the answer.
    fast.add_tokens([spec.think_open, spec.think_close])
    fast.chat_template = chat_template(spec.think_open, spec.think_close, family.image_markup)
    return fast


def build_tiny_vlm(out_dir: str | Path, spec: TinyVLMSpec, corpus: TokenizerCorpus,
                   setting: str = "model.path") -> Path:
    """Write the tiny model to ``out_dir``, its tokenizer learnt on ``corpus``; same spec and
    corpus, same files. An existing ``out_dir`` is replaced only when it is empty or a tiny model of ours holding no other file and no changed
    one (``_recorded_files``); ``setting`` names where the path came from, for the refusal."""
    out_dir = Path(out_dir)
    staging = staging_dir(out_dir)
    try:
        _save_model(spec, corpus, staging)
        check_replaceable_dir(out_dir, _recorded_files(out_dir, staging), setting,
                              "Choose a new or empty directory.")
        # Swap in the finished model only now, so an interrupted build never looks complete.
        shutil.rmtree(out_dir, ignore_errors=True)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _save_model(spec: TinyVLMSpec, corpus: TokenizerCorpus, directory: Path) -> None:
    family = FAMILIES[spec.family]
    parts = family.tiny_parts()
    # A family may write its tokenizer in its own published layout (Kimi-VL: tiktoken.model).
    tokenizer = (parts.tokenizer(spec, corpus.texts(spec.seed), directory) if hasattr(parts, "tokenizer")
                 else _train_tokenizer(spec, corpus))
    config = parts.model_config(spec, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = parts.MODEL_CLASS(config).to(torch.float32)
    model.lm_head.weight.data.mul_(spec.head_scale)
    text = config.text_config
    model.generation_config = GenerationConfig(eos_token_id=[text.eos_token_id, text.pad_token_id],
                                               pad_token_id=text.pad_token_id,
                                               bos_token_id=text.bos_token_id)
    model.save_pretrained(directory)
    family.finish_checkpoint(directory)
    parts.save_processor(tokenizer, directory)
    info = {**_build_info(spec, corpus), "files": file_hashes(directory)}
    (directory / BUILD_INFO).write_text(json.dumps(info, indent=1, sort_keys=True))


def _build_info(spec: TinyVLMSpec, corpus: TokenizerCorpus) -> dict:
    return {**asdict(spec), "corpus_format_version": corpus.version}


def _read_info(out_dir: Path) -> dict:
    """The build record of a tiny model of ours at ``out_dir``; {} when there is none."""
    try:
        info = json.loads((out_dir / BUILD_INFO).read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _recorded_files(out_dir: Path, fresh: Path):
    """The files a build of ours at ``out_dir`` wrote (the record included), with their sha256;
    None when it holds no build record. A record written before builds listed their files
    vouches for the names a build writes (those in ``fresh``, a new build), whatever they hold."""
    info = _read_info(out_dir)
    files = info.get("files")
    if not isinstance(files, dict):
        if not info:
            return None
        files = {p.name: sha256_of(out_dir / p.name) for p in fresh.iterdir()
                 if (out_dir / p.name).is_file()}
    return {**files, BUILD_INFO: sha256_of(out_dir / BUILD_INFO)}


def tiny_vlm_is_current(out_dir: str | Path, spec: TinyVLMSpec, corpus: TokenizerCorpus) -> bool:
    info = _read_info(Path(out_dir))
    info.pop("files", None)
    return info == _build_info(spec, corpus)

"""How long a sequence and how many images the vLLM engines hold, from the config alone.

The prompt budget is ``rollout.max_prompt_text_tokens`` plus, for each of
``rollout.max_images_per_prompt`` images, the vision tokens of an image at ``data.max_pixels``
plus the markers around them (both as the model's family counts them).
``rollout.max_model_len`` defaults to that budget plus the longest generation the config asks
for, must hold them when it is set, and must fit a local model's ``max_position_embeddings``.
``max_images_per_prompt: auto`` becomes a number (``with_image_limit``) from the rows a
command reads before it starts an engine. Nothing here loads a model or imports vLLM: ``kimivl-rl
config check`` uses it.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Optional

from kimivl_rl.config import ConfigError
from kimivl_rl.data.rows import Example
from kimivl_rl.models.families import configured_family

AUTO = "auto"


def prompt_budget(cfg, model: Optional[str] = None) -> int:
    """Tokens the longest prompt may take: its text and its images at the pixel budget, as
    the family of ``model`` (default ``model.path``) counts them."""
    family = configured_family(cfg, model)
    per_image = -(-cfg.data.max_pixels // family.pixels_per_vision_token) + family.image_markers
    return cfg.rollout.max_prompt_text_tokens + images_per_prompt(cfg) * per_image


def longest_generation(cfg) -> tuple[str, int]:
    """The key asking for the most new tokens from an engine, and how many (rollouts and
    held-out evaluation share the engine settings)."""
    asked = {"rollout.max_new_tokens": cfg.rollout.max_new_tokens,
             "sft.eval_max_new_tokens": cfg.sft.eval_max_new_tokens}
    return max(asked.items(), key=lambda item: item[1])


def model_positions(model: Optional[str]) -> Optional[int]:
    """``max_position_embeddings`` of a local model directory; None for a hub name."""
    config_file = Path(model) / "config.json" if model else None
    if config_file is None or not config_file.is_file():
        return None
    config = json.loads(config_file.read_text())
    # Vision-language configs keep it in text_config; older Qwen2.5-VL files at the top level.
    return (config.get("text_config") or {}).get("max_position_embeddings") \
        or config.get("max_position_embeddings")


def max_model_len(cfg, model: Optional[str] = None) -> int:
    """The engines' ``max_model_len``; ``ConfigError`` naming ``rollout.max_model_len`` when it
    cannot hold the prompt budget and the longest generation, or exceeds the positions of
    ``model`` (a local directory; a hub name is not checked)."""
    key, new_tokens = longest_generation(cfg)
    prompt = prompt_budget(cfg, model)
    needed = prompt + new_tokens
    length = cfg.rollout.max_model_len or needed
    if length < needed:
        raise ConfigError(
            f"rollout.max_model_len: {length} tokens cannot hold a prompt of up to "
            f"{prompt} (rollout.max_prompt_text_tokens and rollout.max_images_per_prompt "
            f"images at data.max_pixels) plus {key}={new_tokens}; set it to at least {needed}, "
            f"or leave it unset")
    positions = model_positions(model)
    if positions is not None and length > positions:
        origin = "set" if cfg.rollout.max_model_len else f"the prompt budget plus {key}"
        raise ConfigError(
            f"rollout.max_model_len: {length} tokens ({origin}) exceed the {positions} positions "
            f"of the model {model} (max_position_embeddings); lower {key} or the prompt budget")
    return length


def images_per_prompt(cfg) -> int:
    """The images an engine takes in one prompt. ``auto`` that no rows have fitted (a caller
    that starts engines without reading data first, as tests and benchmarks do) is one, the
    most a row of the built-in data holds."""
    limit = cfg.rollout.max_images_per_prompt
    return 1 if limit == AUTO else limit


def most_images(examples: Iterable[Example]) -> tuple[int, str, int]:
    """The most images one of ``examples`` holds, the first row (``file:line``) holding them, and
    how many rows there were (a loader streams its rows once)."""
    most, source, rows = 0, "", 0
    for rows, example in enumerate(examples, 1):
        if len(example.images) > most:
            most, source = len(example.images), example.source
    return most, source, rows


def check_images(cfg, most: int, source: str) -> None:
    """``ConfigError`` naming ``rollout.max_images_per_prompt`` when a row (``source``, with
    ``most`` images) holds more images than an explicit limit lets an engine take in one prompt."""
    limit = cfg.rollout.max_images_per_prompt
    if limit != AUTO and most > limit:
        raise ConfigError(f"rollout.max_images_per_prompt: {source} has {most} images, over the "
                          f"limit of {limit} an engine takes in one prompt; set "
                          f"rollout.max_images_per_prompt={most} or more, or auto")


def with_image_limit(cfg, most: int):
    """The config with ``rollout.max_images_per_prompt: auto`` made the ``most`` images a row of
    the command's data holds (at least 1); an explicit limit stays as it is."""
    if cfg.rollout.max_images_per_prompt != AUTO:
        return cfg
    return replace(cfg, rollout=replace(cfg.rollout, max_images_per_prompt=max(1, most)))


def fit_images(cfg, examples: Iterable[Example]):
    """The config fitted to the rows a command is about to use, before any engine starts:
    ``check_images`` on the one with the most images, then ``with_image_limit``."""
    most, source, _ = most_images(examples)
    check_images(cfg, most, source)
    return with_image_limit(cfg, most)

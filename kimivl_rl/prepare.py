"""Make sure the model and data a config names exist, building the built-in ones if asked."""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from kimivl_rl.config import Config
from kimivl_rl.data.build import BuildSpec, ensure_dataset
from kimivl_rl.models.tiny import TinyVLMSpec, build_tiny_vlm, tiny_vlm_is_current

log = logging.getLogger(__name__)


def with_absolute_paths(cfg: Config) -> Config:
    """The config with local paths made absolute: Ray workers run in other directories."""
    model_path = Path(cfg.model.path)
    local_model = model_path.exists() or cfg.model.init_if_missing
    return replace(cfg,
                   model=replace(cfg.model, path=str(model_path.resolve()) if local_model else cfg.model.path),
                   data=replace(cfg.data, dir=str(Path(cfg.data.dir).resolve())),
                   output=replace(cfg.output, dir=str(Path(cfg.output.dir).resolve())))


def tiny_spec(cfg: Config) -> TinyVLMSpec:
    return TinyVLMSpec(seed=cfg.model.init_seed, think_open=cfg.model.think_open,
                       think_close=cfg.model.think_close)


def ensure_model(cfg: Config) -> str:
    """The model path to load: the configured one, built as the tiny model when asked to."""
    path = Path(cfg.model.path)
    if not cfg.model.init_if_missing:
        return cfg.model.path  # a local directory or a hub name, loaded as given
    spec = tiny_spec(cfg)
    if path.exists() and not (path / "kimivl_tiny.json").is_file():
        return cfg.model.path  # the user's own checkpoint: never overwritten
    if not tiny_vlm_is_current(path, spec):
        log.info("building the tiny model at %s (seed %d)", path, spec.seed)
        build_tiny_vlm(path, spec)
    return str(path)


def ensure_data(cfg: Config, progress: bool = True) -> Path:
    """The data directory; the built-in data set is (re)built when missing or stale."""
    if not cfg.data.build_if_missing:
        return Path(cfg.data.dir)
    return ensure_dataset(BuildSpec.from_config(cfg.data), cfg.data.dir, progress)

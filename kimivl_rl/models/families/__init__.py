"""The model families kimivl-rl trains, and how a model or a config finds its own."""
from __future__ import annotations

import json
from pathlib import Path

from kimivl_rl.config import ConfigError
from kimivl_rl.models.families.base import ModelFamily, inner_model
from kimivl_rl.models.families.kimi_k25 import KimiK25
from kimivl_rl.models.families.kimi_vl import KimiVL
from kimivl_rl.models.families.qwen2_5_vl import Qwen25VL

FAMILIES: dict[str, type[ModelFamily]] = {f.name: f for f in (Qwen25VL, KimiK25, KimiVL)}
DEFAULT_FAMILY = Qwen25VL.name   # the tiny model's architecture unless model.family says
TINY_BUILD_INFO = "kimivl_tiny.json"  # marks a tiny model of ours (kimivl_rl.models.tiny)


def family_of(model) -> ModelFamily:
    """The family of a loaded model (maybe inside a DeepSpeed engine), bound to it."""
    config = getattr(model, "module", model).config
    return family_class(config.model_type, f"the model ({type(model).__name__})")(model)


def family_class(model_type: str, where: str) -> type[ModelFamily]:
    """The family handling Hugging Face ``model_type``; ``ConfigError`` naming ``where`` when none does."""
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    raise ConfigError(f"{where}: model type {model_type!r} is not supported by kimivl-rl; "
                      f"supported: {', '.join(t for f in FAMILIES.values() for t in f.model_types)}")


def local_model_type(path: str | Path):
    """``model_type`` in a local model directory's config.json; None without one."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return None
    try:
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError) as exc:
        raise ConfigError(f"{config_file}: not a readable JSON model config ({exc})") from None
    if not isinstance(model_type, str):
        raise ConfigError(f"{config_file}: no model_type, so not a Hugging Face model config")
    return model_type


def configured_family(cfg, path: str | Path | None = None) -> type[ModelFamily]:
    """The family a config trains: ``model.family``, checked against the config.json of the
    local model at ``path`` (default ``model.path``) when there is one; with ``auto``, that
    config.json decides, and a model still to be built is the tiny model's default family.
    ``ConfigError`` naming ``model.family`` when they disagree or nothing decides."""
    path = cfg.model.path if path is None else path
    chosen = cfg.model.family
    if chosen != "auto" and rebuilt_as_tiny(cfg, path):
        return FAMILIES[chosen]
    found = local_model_type(path)
    if found is not None:
        family = family_class(found, f"{path}/config.json")
        if chosen not in ("auto", family.name):
            raise ConfigError(f"model.family: {chosen!r}, but the model at {path} is {family.name} "
                              f"(config.json model_type {found!r}); set model.family={family.name} "
                              f"or auto")
        return family
    if chosen != "auto":
        return FAMILIES[chosen]
    if rebuilt_as_tiny(cfg, path):
        return FAMILIES[DEFAULT_FAMILY]
    raise ConfigError(f"model.family: auto cannot tell the family of {path} (no local config.json "
                      f"to read); set model.family to one of {', '.join(FAMILIES)}")


def register_local_classes(path: str | Path) -> None:
    """Before transformers reads the local model at ``path``: its family's classes, where
    transformers has none of its own (``ModelFamily.register_classes``)."""
    model_type = local_model_type(path)
    for family in FAMILIES.values():
        if model_type in family.model_types:  # another type is refused, and why, by the checks after
            family.register_classes()


def register_all_classes() -> None:
    """Every family's classes (vLLM's plugin hook, setup.cfg: vLLM may spawn its processes,
    which import nothing of ours before they build a processor)."""
    for family in FAMILIES.values():
        family.register_classes()


def rebuilt_as_tiny(cfg, path: str | Path) -> bool:
    """Whether ``path`` is the tiny model's to build (missing, or a tiny model of ours, which
    is rebuilt when its settings change) rather than a model to load as it is."""
    path = Path(path)
    return cfg.model.init_if_missing and (not path.exists() or (path / TINY_BUILD_INFO).is_file())


__all__ = ["FAMILIES", "DEFAULT_FAMILY", "ModelFamily", "family_of", "family_class",
           "configured_family", "inner_model", "register_local_classes"]

"""Load a YAML config into the typed tree, with dotted command-line overrides.

Every problem is a ``ConfigError`` naming the dotted key and where it came from
(``file:line`` for YAML, the override text for the command line), and an unknown key or
choice comes with the closest valid spelling.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from kimivl_rl.config.schema import TEMPLATE_SLOT, Config


class ConfigError(ValueError):
    """A config value that cannot be used, located as precisely as the source allows."""


# ----------------------------------------------------------------------------- YAML + lines

# Values a config may hold once YAML aliases are expanded: a real config has a few hundred, and
# nine aliases of nine aliases of ... ("billion laughs") would otherwise expand without end.
MAX_YAML_VALUES = 10_000
RAY_BUILTIN_RESOURCES = {"CPU", "GPU", "memory", "object_store_memory"}


_PLAIN_COLLECTION_TAGS = {yaml.MappingNode: "tag:yaml.org,2002:map",
                          yaml.SequenceNode: "tag:yaml.org,2002:seq"}


class _YamlReader:
    """Converts composed YAML nodes, recording the 1-based line of every dotted key."""

    def __init__(self, file: Path):
        self.file = file
        self.lines: dict[str, int] = {}
        self.budget = MAX_YAML_VALUES

    def _error(self, node: yaml.Node, path: str, message: str) -> ConfigError:
        return ConfigError(f"{self.file}:{node.start_mark.line + 1}: {path or '<top>'}: {message}")

    def _scalar(self, node: yaml.Node, path: str) -> Any:
        try:
            return yaml.safe_load(yaml.serialize(node))
        except yaml.YAMLError as exc:  # e.g. a !!python/object tag, which safe_load refuses
            problem = getattr(exc, "problem", None) or str(exc)
            raise self._error(node, path, f"not a plain YAML value: {problem}") from None

    def convert(self, node: yaml.Node, path: str = "") -> Any:
        self.budget -= 1
        if self.budget < 0:
            raise self._error(node, path, f"more than {MAX_YAML_VALUES} values (aliases "
                                          f"expanding?)")
        self.lines.setdefault(path, node.start_mark.line + 1)
        plain_tag = _PLAIN_COLLECTION_TAGS.get(type(node))
        if plain_tag is not None and node.tag != plain_tag:  # e.g. !!python/object/apply:...
            raise self._error(node, path, f"not a plain YAML value: tag {node.tag!r}")
        if isinstance(node, yaml.MappingNode):
            out = {}
            for key_node, value_node in node.value:
                key = str(self._scalar(key_node, path))
                child = f"{path}.{key}" if path else key
                if key in out:
                    raise self._error(key_node, child, f"duplicate key (first set on line "
                                                       f"{self.lines[child]})")
                self.lines[child] = key_node.start_mark.line + 1
                out[key] = self.convert(value_node, child)
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.convert(item, f"{path}.{i}") for i, item in enumerate(node.value)]
        return self._scalar(node, path)


def read_yaml(path: str | Path) -> tuple[dict, dict[str, int]]:
    """Read a YAML mapping and the line number of each dotted key in it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text ({exc.reason} at byte {exc.start}); "
                          f"config files must be UTF-8") from None
    try:
        node = yaml.compose(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    reader = _YamlReader(path)
    data = {} if node is None else reader.convert(node)
    lines = reader.lines
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: the top level must be a mapping of sections")
    return data, lines


# ----------------------------------------------------------------------------- overrides

def apply_override(data: dict, text: str) -> str:
    """Set ``a.b.c=value`` (value parsed as YAML) in the nested dict; return the dotted key."""
    key, sep, raw_value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override '{text}': expected KEY=VALUE, e.g. rl.samples_per_prompt=8")
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else ""
    except yaml.YAMLError:
        value = raw_value
    parts = key.split(".")
    node: Any = data
    for depth, part in enumerate(parts[:-1]):
        node = _child_for_override(node, part, ".".join(parts[: depth + 1]), text)
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, key, text)] = value
    else:
        node[last] = value
    return key


def _child_for_override(node: Any, part: str, dotted: str, text: str) -> Any:
    if isinstance(node, list):
        return node[_list_index(node, part, dotted, text)]
    if not isinstance(node.get(part, {}), (dict, list)):
        raise ConfigError(f"override '{text}': {dotted} is a value, not a section")
    return node.setdefault(part, {})


def _list_index(node: list, part: str, dotted: str, text: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override '{text}': {dotted}: no list item {part!r} (have {len(node)})")
    return int(part)


# ----------------------------------------------------------------------------- typed build

class _Where:
    """Says where a dotted key came from, for error messages."""

    def __init__(self, file: str, lines: dict[str, int], overrides: dict[str, str]):
        self.file, self.lines, self.overrides = file, lines, overrides

    def __call__(self, key: str) -> str:
        for dotted, text in self.overrides.items():
            if key == dotted or key.startswith(dotted + "."):
                return f"command-line override '{text}'"
        if key not in self.lines:  # a section that only an override created
            for dotted, text in self.overrides.items():
                if dotted.startswith(key + "."):
                    return f"command-line override '{text}'"
        probe = key
        while probe and probe not in self.lines:
            probe = probe.rpartition(".")[0]
        line = self.lines.get(probe)
        return f"{self.file}:{line}" if line else self.file

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self(key)}: {key}: {message}")


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""


def _build_dataclass(cls, raw: Any, key: str, where: _Where, base=None):
    """Fields given in ``raw`` replace those of ``base`` (the default when not given)."""
    base = cls() if base is None else base
    if not isinstance(raw, dict):
        raise where.error(key or "<top>", f"expected a mapping of {cls.__name__} fields, got {_kind(raw)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in raw.items():
        child = f"{key}.{name}" if key else name
        if name not in fields:
            raise where.error(child, f"unknown key '{name}'{_suggest(name, fields)} "
                                     f"(valid keys: {', '.join(fields)})")
        kwargs[name] = _coerce(hints[name], value, child, where, getattr(base, name))
        _check_bounds(fields[name], kwargs[name], child, where)
    return dataclasses.replace(base, **kwargs)


def _kind(value: Any) -> str:
    return "nothing" if value is None else f"{type(value).__name__} {value!r}"


def _coerce(tp, value: Any, key: str, where: _Where, base=None):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, key, where, base)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _coerce_either(args, value, key, where)
    if origin is Literal:
        if value not in args:
            raise where.error(key, f"{value!r} is not one of {list(args)}{_suggest(value, args)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise where.error(key, f"expected a list, got {_kind(value)}")
        return [_coerce(args[0], item, f"{key}.{i}", where) for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise where.error(key, f"expected a mapping, got {_kind(value)}")
        return {_coerce(args[0], name, key, where): _coerce(args[1], item, f"{key}.{name}", where)
                for name, item in value.items()}
    return _coerce_scalar(tp, value, key, where)


def _coerce_either(args: tuple, value: Any, key: str, where: _Where):
    """The first of a union's types that takes ``value`` (e.g. ``int`` or ``"auto"``); one
    type's own error when it is the only one."""
    choices = [a for a in args if a is not type(None)]
    for choice in choices:
        try:
            return _coerce(choice, value, key, where)
        except ConfigError:
            if len(choices) == 1:
                raise
    names = [" or ".join(map(repr, typing.get_args(c))) if typing.get_origin(c) is Literal
             else c.__name__ for c in choices]
    raise where.error(key, f"expected {' or '.join(names)}, got {_kind(value)}")


def _coerce_scalar(tp, value: Any, key: str, where: _Where):
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is float and not isinstance(value, bool):
        number = None
        if isinstance(value, (int, float)):
            try:
                number = float(value)
            except OverflowError:  # an int too large for a float
                number = math.inf
        elif isinstance(value, str):  # PyYAML reads "1e-4" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):
                raise where.error(key, f"expected a finite number, got {_kind(value)}")
            return number
    if tp is str and isinstance(value, str):
        return value
    raise where.error(key, f"expected {tp.__name__}, got {_kind(value)}")


def _check_bounds(f: dataclasses.Field, value: Any, key: str, where: _Where) -> None:
    if isinstance(value, dict):  # a mapping's bounds hold for each of its values
        for name, item in value.items():
            _check_bounds(f, item, f"{key}.{name}", where)
        return
    if value is None or not isinstance(value, (int, float)):
        return
    ge, gt, le = (f.metadata.get(b) for b in ("ge", "gt", "le"))
    if ge is not None and value < ge:
        raise where.error(key, f"{value} is out of range: must be >= {ge}")
    if gt is not None and value <= gt:
        raise where.error(key, f"{value} is out of range: must be > {gt}")
    if le is not None and value > le:
        raise where.error(key, f"{value} is out of range: must be <= {le}")


def _check_consistency(cfg: Config, where: _Where) -> None:
    """Rules that span fields; each names the key to change."""
    for stage in ("joint", "long_cot"):
        stage_cfg = getattr(cfg.sft, stage)
        for i, phase in enumerate(stage_cfg.phases):
            if phase.lr_final > phase.lr_peak:
                raise where.error(f"sft.{stage}.phases.{i}.lr_final",
                                  f"{phase.lr_final} is above lr_peak {phase.lr_peak}")
        _check_replay(stage, stage_cfg, where)
    if cfg.data.prompt_template and TEMPLATE_SLOT not in cfg.data.prompt_template:
        raise where.error("data.prompt_template", f"must hold {TEMPLATE_SLOT} where the row's "
                          f"prompt goes (or be empty for none)")
    for key in ("prompt_key", "answer_key", "image_key"):
        if not getattr(cfg.data, key):
            raise where.error(f"data.{key}", "must name a column (it is empty)")
    if cfg.model.think_open == cfg.model.think_close:
        raise where.error("model.think_close", "must differ from model.think_open")
    if cfg.eval.tier_min_accuracy > cfg.eval.tier_max_accuracy:
        raise where.error("eval.tier_min_accuracy", f"{cfg.eval.tier_min_accuracy} is above "
                          f"eval.tier_max_accuracy {cfg.eval.tier_max_accuracy}: the band is empty")
    budget = cfg.rollout.token_budget
    if budget is not None and budget >= cfg.rollout.max_new_tokens:
        raise where.error("rollout.token_budget", f"{budget} leaves nothing to carry over: set it "
                          f"below rollout.max_new_tokens ({cfg.rollout.max_new_tokens}), or null")
    if budget is not None and cfg.rl.max_staleness < 2:
        raise where.error("rollout.token_budget", "partial rollouts need rl.max_staleness >= 2: "
                          "responses are sampled one version behind the learner, and a continued "
                          "one is a version older still")
    if cfg.rl.offload_optimizer and not cfg.rl.zero_stage:
        raise where.error("rl.offload_optimizer", "ZeRO-Offload moves ZeRO's optimizer partitions: "
                          "set rl.zero_stage to 1, 2 or 3")
    _check_colocation(cfg, where)
    for role in ("learner", "rollout", "reward"):
        # Ray sets these from an actor's num_cpus and num_gpus and refuses them as custom resources.
        builtin = RAY_BUILTIN_RESOURCES & set(getattr(cfg.cluster, f"{role}_resources"))
        if builtin:
            raise where.error(f"cluster.{role}_resources", f"{', '.join(sorted(builtin))}: set by "
                              f"cluster.{role}_cpus and cluster.use_gpu, not here")


def _check_replay(stage: str, stage_cfg, where: _Where) -> None:
    """Replay and keep-solved settings that would do nothing are refused, not ignored."""
    if not stage_cfg.replay_file:
        for key in ("replay_examples", "replay_system_prompt"):
            if getattr(stage_cfg, key):
                raise where.error(f"sft.{stage}.{key}", f"replays nothing: set "
                                  f"sft.{stage}.replay_file to the file to replay from")
    if stage_cfg.unsolved_fraction and not stage_cfg.keep_solved:
        raise where.error(f"sft.{stage}.unsolved_fraction", f"applies only with "
                          f"sft.{stage}.keep_solved: true")


def _check_colocation(cfg: Config, where: _Where) -> None:
    """``cluster.colocate`` pairs one engine with one learner rank on one device."""
    cluster = cfg.cluster
    if cluster.weight_transport == "ipc" and not cluster.colocate:
        raise where.error("cluster.weight_transport", "ipc shares buffers between the learner and an "
                          "engine on one device: set cluster.colocate: true, or use collective")
    if not cluster.colocate:
        return
    if cluster.use_gpu and cluster.weight_transport == "collective":
        raise where.error("cluster.weight_transport", "NCCL cannot join two processes on one GPU: "
                          "use ipc with cluster.colocate")
    single = {"cluster.num_learners": cluster.num_learners, "rollout.num_workers": cfg.rollout.num_workers,
              "rollout.tensor_parallel_size": cfg.rollout.tensor_parallel_size}
    for key, value in single.items():
        if value != 1:
            raise where.error(key, f"{value}: cluster.colocate pairs one learner rank with one "
                              f"engine on one device; set it to 1, or colocate: false")
    if cfg.rl.max_staleness:
        raise where.error("rl.max_staleness", "a colocated engine sleeps while the learner steps, "
                          "so nothing overlaps: set it to 0, or cluster.colocate: false")


def _merged(base: dict, update: dict) -> dict:
    """``update`` laid over ``base``; nested mappings merge, anything else replaces."""
    out = dict(base)
    for key, value in update.items():
        both_maps = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merged(out[key], value) if both_maps else value
    return out


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Build a ``Config`` from the defaults, an optional YAML file and ``key=value`` overrides."""
    data, lines = read_yaml(path) if path is not None else ({}, {})
    # Overrides address the full tree, defaults included (e.g. sft.joint.phases.0.epochs).
    data = _merged(config_to_dict(Config()), data)
    where_overridden = {apply_override(data, text): text for text in overrides}
    where = _Where(str(path) if path is not None else "<defaults>", lines, where_overridden)
    cfg = _build_dataclass(Config, data, "", where)
    _check_consistency(cfg, where)
    return cfg


def config_from_dict(data: dict) -> Config:
    """Rebuild a config from ``config_to_dict`` output (e.g. inside a Ray worker)."""
    return _build_dataclass(Config, data, "", _Where("<dict>", {}, {}))


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)

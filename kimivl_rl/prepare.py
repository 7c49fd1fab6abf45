"""Make sure the model and data a config names exist, building the built-in ones if asked."""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Iterable

from kimivl_rl.config import Config
from kimivl_rl.data.build import (FORMAT_VERSION, BuildSpec, check_replaceable, corpus_texts,
                                  dataset_is_current, ensure_dataset)
from kimivl_rl.data.rows import RowLoader
from kimivl_rl.infra.ownership import OUTPUT_MARKER, claim_output_dir
from kimivl_rl.rollout.limits import check_images, most_images, with_image_limit

log = logging.getLogger(__name__)


def with_absolute_paths(cfg: Config) -> Config:
    """The config with local paths made absolute: Ray workers run in other directories."""
    model_path = Path(cfg.model.path)
    local_model = model_path.exists() or cfg.model.init_if_missing
    return replace(cfg,
                   model=replace(cfg.model, path=str(model_path.resolve()) if local_model else cfg.model.path),
                   data=replace(cfg.data, dir=str(Path(cfg.data.dir).resolve())),
                   output=replace(cfg.output, dir=str(Path(cfg.output.dir).resolve())))


def ensure_model(cfg: Config) -> str:
    """The model path to load: the configured one, built as the tiny model when asked to."""
    from kimivl_rl.models.families import configured_family, rebuilt_as_tiny
    from kimivl_rl.models.loading import check_remote_code
    # torch comes with these: imported here, so the checks before any build stay quick.
    from kimivl_rl.models.tiny import TinyVLMSpec, build_tiny_vlm, tiny_vlm_is_current

    path = Path(cfg.model.path)
    if not rebuilt_as_tiny(cfg, path):
        # A local directory or a hub name, loaded as given (a user's checkpoint is never
        # overwritten). Before Ray starts: one that needs custom code is refused unless allowed,
        # and so is an architecture no family handles.
        check_remote_code(cfg.model.path, cfg.model.trust_remote_code)
        configured_family(cfg)
        return cfg.model.path
    family = configured_family(cfg).name
    spec = TinyVLMSpec(seed=cfg.model.init_seed, family=family, think_open=cfg.model.think_open,
                       think_close=cfg.model.think_close)
    if not tiny_vlm_is_current(path, spec, tiny_corpus()):
        log.info("building the tiny model at %s (seed %d)", path, spec.seed)
        build_tiny_vlm(path, spec, tiny_corpus())
    return str(path)


def tiny_corpus():
    """The tiny model's tokenizer corpus: the built-in data set's questions, answers and traces,
    so a new data format means a new model."""
    from kimivl_rl.models.tiny import TokenizerCorpus

    return TokenizerCorpus(corpus_texts, FORMAT_VERSION)


def ensure_data(cfg: Config, progress: bool = True) -> Path:
    """The data directory; the built-in data set is (re)built when missing or stale."""
    if not cfg.data.build_if_missing:
        return Path(cfg.data.dir)
    return ensure_dataset(BuildSpec.from_config(cfg.data), cfg.data.dir, progress)


# The top level of an output directory written before kimivl-rl marked its output directories.
EARLIER_OUTPUT_ENTRIES = {"config.yaml", "summary.json", "plots", "tensorboard", "sft_joint",
                          "sft_long_cot", "rl"}
EARLIER_STAGE_DIRS = {"sft_joint", "sft_long_cot", "rl"}


def _earlier_run_output(directory: Path) -> bool:
    """An output directory of an earlier run: only names a run writes, a stage among them."""
    names = {p.name for p in directory.iterdir()}
    return names <= EARLIER_OUTPUT_ENTRIES and bool(names & EARLIER_STAGE_DIRS)


def claim_targets(cfg: Config, output: bool = True) -> None:
    """Before anything is built or started: refuse (``NotOursError``) a ``data.dir`` that would be
    rebuilt or an ``output.dir`` that kimivl-rl did not write (``kimivl_rl.infra.ownership``), and,
    when the command writes outputs, create and mark ``output.dir``."""
    spec = BuildSpec.from_config(cfg.data)
    if cfg.data.build_if_missing and not dataset_is_current(spec, cfg.data.dir):
        check_replaceable(cfg.data.dir)
    if output:
        claim_output_dir(Path(cfg.output.dir), "output.dir",
                         f"Choose a new or empty output.dir (kimivl-rl marks the ones it creates "
                         f"with {OUTPUT_MARKER} and writes again into those).",
                         _earlier_run_output)


STAGES = ("joint", "long_cot", "rl")


def stage_data_files(cfg: Config, stage: str) -> list[tuple[Path, bool]]:
    """(file, whether its rows need an ``answer``) for each data file a stage reads: its
    training file, its replay file if any, and its held-out evaluation file."""
    if stage == "rl":
        return [(Path(cfg.data.dir) / cfg.rl.train_file, True),
                (Path(cfg.data.dir) / cfg.rl.eval_file, True)]
    if stage not in ("joint", "long_cot"):
        raise ValueError(f"unknown stage {stage!r}; choose from {STAGES}")
    stage_cfg = getattr(cfg.sft, stage)
    replay = [(Path(cfg.data.dir) / stage_cfg.replay_file, False)] if stage_cfg.replay_file else []
    return [(Path(cfg.data.dir) / stage_cfg.train_file, False), *replay,
            (Path(cfg.data.dir) / stage_cfg.eval_file, True)]


def check_data(cfg: Config, stages: Iterable[str] = STAGES,
               missing_ok: bool = False) -> dict[str, dict[str, int]]:
    """Read every row and image of the data files the stages use, exactly as training will.

    Call it before anything starts (Ray, output directories): a bad row raises ``DataError``
    naming ``file:line`` and the field, unless ``data.bad_rows=skip``, in which case it is
    counted; a row with more images than an explicit ``rollout.max_images_per_prompt`` raises
    ``ConfigError`` naming that key. ``missing_ok`` passes over files that do not exist
    (``kimivl-rl config check``). Returns, per file, ``{"rows", "skipped", "resized",
    "images"}`` (the most images one row holds). Reads only; writes nothing.
    """
    report: dict[str, dict[str, int]] = {}
    seen: set[tuple[Path, bool]] = set()
    for stage in stages:
        for path, require_answer in stage_data_files(cfg, stage):
            if (path, require_answer) in seen or (missing_ok and not path.is_file()):
                continue
            seen.add((path, require_answer))
            report[str(path)] = _check_file(cfg, path, require_answer)
    return report


def checked_config(cfg: Config, stages: Iterable[str] = STAGES, missing_ok: bool = False) -> Config:
    """``check_data``, and the config fitted to the rows it read: ``rollout.max_images_per_prompt:
    auto`` becomes the most images one row of those files holds."""
    report = check_data(cfg, stages, missing_ok)
    return with_image_limit(cfg, max((counts["images"] for counts in report.values()), default=0))


def _check_file(cfg: Config, path: Path, require_answer: bool) -> dict[str, int]:
    loader = RowLoader.for_config(path, cfg.data, require_answer=require_answer)
    most, source, rows = most_images(loader)
    # SFT training files too: keep_solved generates from them, and one limit is simpler to state.
    check_images(cfg, most, source)
    log.info("%s: %d row(s) valid, %d skipped, %d image(s) resized", path, rows,
             loader.skipped, loader.resized)
    return {"rows": rows, "skipped": loader.skipped, "resized": loader.resized, "images": most}

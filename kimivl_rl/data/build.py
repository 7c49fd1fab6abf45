"""Write the built-in data set: joint SFT, long-CoT SFT and RL prompts, each with a held-out
split, in the documented row format (see ``kimivl_rl.data.rows``), from one seed.

Every example is drawn from its own generator seeded by (seed, split, index), so a file's
content depends only on the seed and its size, never on what was generated before it.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
from tqdm import tqdm

from kimivl_rl.data.tasks import MAX_DIFFICULTY, TASK_KINDS, Task, make_task
from kimivl_rl.data.traces import long_cot_reasoning
from kimivl_rl.infra.ownership import check_replaceable_dir, file_hashes, sha256_of, staging_dir

MANIFEST = "manifest.json"
FORMAT_VERSION = 15  # bump when generated content changes for the same spec
_SPLIT_IDS = {"joint_sft": 1, "long_cot": 2, "rl": 3, "corpus": 4}
_PART_IDS = {"train": 0, "eval": 1}


@dataclass(frozen=True)
class BuildSpec:
    seed: int = 0
    joint_sft_examples: int = 2000
    long_cot_examples: int = 400
    rl_prompts: int = 600
    eval_examples: int = 100
    image_size: int = 112
    max_difficulty: int = MAX_DIFFICULTY
    arith_fraction: float = 0.5

    @classmethod
    def from_config(cls, data_cfg) -> "BuildSpec":
        return cls(**{name: getattr(data_cfg, name) for name in cls.__dataclass_fields__})


def sample_task(spec: BuildSpec, split: str, part: str, index: int) -> Task:
    """The task at ``index`` of a split; arithmetic by ``arith_fraction``."""
    rng = np.random.default_rng([spec.seed, _SPLIT_IDS[split], _PART_IDS[part], index])
    if rng.random() < spec.arith_fraction:
        kind = "arith"
    else:
        kind = str(rng.choice([k for k in TASK_KINDS if k != "arith"]))
    return make_task(kind, rng, _draw_difficulty(rng, spec.max_difficulty), spec.image_size)


def _draw_difficulty(rng: np.random.Generator, max_difficulty: int) -> int:
    """Easier levels are drawn more often, P(d) ∝ max_difficulty + 1 - d, so a tiny model
    learns the easy end in minutes while the hard end stays in every split."""
    levels = np.arange(1, max_difficulty + 1)
    weights = (max_difficulty + 1 - levels) / (max_difficulty + 1 - levels).sum()
    return int(rng.choice(levels, p=weights))


def _user_message(task: Task) -> dict:
    if task.image is None:
        return {"role": "user", "content": task.question}
    return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": task.question}]}


def task_row(task: Task, split: str, image_path: Optional[str]) -> dict:
    """One row of the documented format for a task in a given split."""
    messages = [_user_message(task)]
    if split == "joint_sft":
        messages.append({"role": "assistant", "content": task.final_answer})
    elif split == "long_cot":
        messages.append({"role": "assistant", "reasoning_content": long_cot_reasoning(task),
                         "content": task.final_answer})
    return {"messages": messages, "images": [image_path] if image_path else [],
            "answer": task.answer, "difficulty": task.difficulty, "task": task.kind}


def _rows(spec: BuildSpec, split: str, part: str, count: int, split_dir: Path) -> Iterator[dict]:
    for index in range(count):
        task = sample_task(spec, split, part, index)
        image_path = None
        if task.image is not None:
            image_path = f"images/{part}_{index:06d}.png"
            task.image.save(split_dir / image_path, format="PNG")
        yield task_row(task, split, image_path)


def _split_sizes(spec: BuildSpec) -> dict[str, int]:
    return {"joint_sft": spec.joint_sft_examples, "long_cot": spec.long_cot_examples,
            "rl": spec.rl_prompts}


def _write_splits(spec: BuildSpec, directory: Path, progress: bool) -> None:
    jobs = [(split, part, size if part == "train" else spec.eval_examples)
            for split, size in _split_sizes(spec).items() for part in ("train", "eval")]
    bar = tqdm(total=sum(n for *_, n in jobs), desc="building data", unit="ex", disable=not progress)
    for split, part, count in jobs:
        split_dir = directory / split
        (split_dir / "images").mkdir(parents=True, exist_ok=True)
        with open(split_dir / f"{part}.jsonl", "w", encoding="utf-8") as f:
            for row in _rows(spec, split, part, count, split_dir):
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                bar.update()
    bar.close()


def _manifest(out_dir: Path) -> Optional[dict]:
    """The manifest of a build of ours at ``out_dir``; None when there is none."""
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) else None


def _recorded_files(out_dir: Path) -> Optional[dict[str, str]]:
    """The files a build of ours at ``out_dir`` wrote (the manifest included), with their sha256."""
    manifest = _manifest(out_dir)
    return None if manifest is None else {**manifest["files"], MANIFEST: sha256_of(out_dir / MANIFEST)}


def check_replaceable(out_dir: str | Path, setting: str = "data.dir", fix: str = "") -> None:
    """Raise ``NotOursError`` unless ``out_dir`` is missing, empty, or a build of ours that holds
    no other file and no changed one (see ``kimivl_rl.infra.ownership``)."""
    out_dir = Path(out_dir)
    check_replaceable_dir(out_dir, _recorded_files(out_dir), setting, fix or (
        f"To train on your own files set data.build_if_missing=false; to build the built-in data "
        f"set choose a new or empty {setting}."))


def write_with_manifest(out_dir: Path, write: Callable[[Path], dict], setting: str,
                        fix: str = "") -> dict:
    """Fill a new ``out_dir`` with ``write(directory)`` and a manifest of what it returns plus
    the checksums of the files; an existing ``out_dir`` is replaced only when it is ours
    (``check_replaceable``). ``setting`` and ``fix`` name the path's origin in a refusal.
    Returns the manifest."""
    check_replaceable(out_dir, setting, fix)
    staging = staging_dir(out_dir)
    try:
        manifest = {**write(staging), "files": file_hashes(staging)}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        check_replaceable(out_dir, setting, fix)  # again: files may have appeared while it wrote
        # Swap in the finished tree only now, so an interrupted write never looks complete.
        shutil.rmtree(out_dir, ignore_errors=True)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def build_dataset(spec: BuildSpec, out_dir: str | Path, progress: bool = True,
                  setting: str = "data.dir") -> Path:
    """Write every split under ``out_dir`` and a manifest with checksums (``write_with_manifest``);
    ``setting`` names where the path came from, for a refusal."""
    def write(directory: Path) -> dict:
        _write_splits(spec, directory, progress)
        return {"format_version": FORMAT_VERSION, "spec": spec.__dict__}

    write_with_manifest(Path(out_dir), write, setting)
    return Path(out_dir)


def dataset_is_current(spec: BuildSpec, out_dir: str | Path) -> bool:
    manifest = _manifest(Path(out_dir))
    return (manifest is not None and manifest.get("format_version") == FORMAT_VERSION
            and manifest.get("spec") == spec.__dict__)


def ensure_dataset(spec: BuildSpec, out_dir: str | Path, progress: bool = True) -> Path:
    """Build the data set unless an identical build is already there."""
    if dataset_is_current(spec, out_dir):
        return Path(out_dir)
    return build_dataset(spec, out_dir, progress)


def corpus_texts(seed: int, count: int = 3000) -> Iterator[str]:
    """Text the tiny model's tokenizer is trained on: questions, answers and traces."""
    spec = BuildSpec(seed=seed, arith_fraction=0.4)
    for index in range(count):
        task = sample_task(spec, "corpus", "train", index)
        yield task.question
        yield task.final_answer
        yield long_cot_reasoning(task)

"""Write the built-in data set: joint SFT, long-CoT SFT and RL prompts, each with a held-out
split, in the documented row format (see ``kimivl_rl.data.rows``), from one seed.

Every example is drawn from its own generator seeded by (seed, split, index), so a file's
content depends only on the seed and its size, never on what was generated before it.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from tqdm import tqdm

from kimivl_rl.data.tasks import MAX_DIFFICULTY, TASK_KINDS, Task, make_task
from kimivl_rl.data.traces import long_cot_reasoning

MANIFEST = "manifest.json"
FORMAT_VERSION = 7  # bump when generated content changes for the same spec
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
    text_fraction: float = 0.5

    @classmethod
    def from_config(cls, data_cfg) -> "BuildSpec":
        return cls(**{name: getattr(data_cfg, name) for name in cls.__dataclass_fields__})


def sample_task(spec: BuildSpec, split: str, part: str, index: int) -> Task:
    """The task at ``index`` of a split; text or image by ``text_fraction``."""
    rng = np.random.default_rng([spec.seed, _SPLIT_IDS[split], _PART_IDS[part], index])
    if rng.random() < spec.text_fraction:
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


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _split_sizes(spec: BuildSpec) -> dict[str, int]:
    return {"joint_sft": spec.joint_sft_examples, "long_cot": spec.long_cot_examples,
            "rl": spec.rl_prompts}


def build_dataset(spec: BuildSpec, out_dir: str | Path, progress: bool = True) -> Path:
    """Write every split under ``out_dir`` (replacing it) and a manifest with checksums."""
    out_dir = Path(out_dir)
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    jobs = [(split, part, size if part == "train" else spec.eval_examples)
            for split, size in _split_sizes(spec).items() for part in ("train", "eval")]
    bar = tqdm(total=sum(n for *_, n in jobs), desc="building data", unit="ex", disable=not progress)
    for split, part, count in jobs:
        split_dir = staging / split
        (split_dir / "images").mkdir(parents=True, exist_ok=True)
        with open(split_dir / f"{part}.jsonl", "w", encoding="utf-8") as f:
            for row in _rows(spec, split, part, count, split_dir):
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                bar.update()
    bar.close()
    files = sorted(p for p in staging.rglob("*") if p.is_file())
    manifest = {"format_version": FORMAT_VERSION, "spec": spec.__dict__,
                "files": {str(p.relative_to(staging)): _sha256(p) for p in files}}
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    # Swap in the finished tree only now, so an interrupted build never looks complete.
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    return out_dir


def dataset_is_current(spec: BuildSpec, out_dir: str | Path) -> bool:
    manifest = Path(out_dir) / MANIFEST
    if not manifest.is_file():
        return False
    recorded = json.loads(manifest.read_text())
    return recorded.get("format_version") == FORMAT_VERSION and recorded.get("spec") == spec.__dict__


def ensure_dataset(spec: BuildSpec, out_dir: str | Path, progress: bool = True) -> Path:
    """Build the data set unless an identical build is already there."""
    if dataset_is_current(spec, out_dir):
        return Path(out_dir)
    return build_dataset(spec, out_dir, progress)


def corpus_texts(seed: int, count: int = 3000) -> Iterator[str]:
    """Text the tiny model's tokenizer is trained on: questions, answers and traces."""
    spec = BuildSpec(seed=seed, text_fraction=0.4)
    for index in range(count):
        task = sample_task(spec, "corpus", "train", index)
        yield task.question
        yield task.final_answer
        yield long_cot_reasoning(task)

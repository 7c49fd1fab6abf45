"""Build a long-CoT SFT set by rejection sampling from a teacher (docs/recipe.md, stage 2).

For every prompt the teacher samples several responses on the project's rollout workers; the
reward service checks each final answer against the prompt's reference; a response becomes a
training row only when, in this order,

1. its answer is verified correct (reward score 1)                    else ``wrong_answer``
2. it is at least ``min_response_tokens`` long                          else ``too_short``
3. it is at most ``max_response_tokens`` long and was not cut off at
   the generation limit                                                 else ``too_long``
4. its closed thinking section shows at least ``min_behaviours`` of the
   four behaviours (``kimivl_rl.data.traces.BEHAVIOUR_MARKERS``)        else ``missing_behaviours``
5. no earlier kept response to the same prompt has the same normalised
   thinking + answer text                                               else ``duplicate``

Each rejected response is counted under the first rule it fails, so per prompt
``kept + sum(rejected) == sampled``. Rows follow the documented format
(``kimivl_rl.data.rows``): the prompt's turns, then an assistant turn with
``reasoning_content`` (the thinking, without markers) and ``content`` (the answer section).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

from kimivl_rl.data.rows import DataError, Example, row_number
from kimivl_rl.data.traces import BEHAVIOUR_MARKERS, trace_behaviours
from kimivl_rl.infra.ownership import (SHA_KEY, check_replaceable_dir, check_replaceable_file,
                                       file_hashes, read_sidecar, sha256_of, sidecar_path,
                                       staging_file)
from kimivl_rl.reward.contract import RewardOutput
from kimivl_rl.reward.extract import split_thinking

log = logging.getLogger(__name__)

REJECT_REASONS = ("wrong_answer", "too_short", "too_long", "missing_behaviours", "duplicate")


@dataclass(frozen=True)
class TraceFilter:
    min_response_tokens: int = 0
    max_response_tokens: Optional[int] = None
    min_behaviours: int = len(BEHAVIOUR_MARKERS)
    think_open: str = "<think>"
    think_close: str = "</think>"


@dataclass(frozen=True)
class Verdict:
    reason: Optional[str]          # None: keep; else one of REJECT_REASONS
    response_tokens: int = 0
    reasoning: Optional[str] = None
    answer: str = ""
    behaviours: tuple[str, ...] = ()


@dataclass
class PromptStats:
    source: str
    sampled: int = 0
    kept: int = 0
    rejected: dict[str, int] = field(default_factory=lambda: {r: 0 for r in REJECT_REASONS})
    # The reward service's reasons for the wrong answers ("wrong answer", "no answer found", ...).
    reward_reasons: dict[str, int] = field(default_factory=dict)


# ----------------------------------------------------------------------------- pure functions

def judge_trace(text: str, num_tokens: int, finish_reason: str, reward: RewardOutput,
                filt: TraceFilter) -> Verdict:
    """Rules 1-4 for one response (rule 5 needs the prompt's other responses)."""
    if reward.score < 1.0:
        return Verdict("wrong_answer", num_tokens)
    if num_tokens < filt.min_response_tokens:
        return Verdict("too_short", num_tokens)
    if finish_reason == "length" or (filt.max_response_tokens is not None
                                     and num_tokens > filt.max_response_tokens):
        return Verdict("too_long", num_tokens)
    reasoning, answer = split_thinking(text, filt.think_open, filt.think_close)
    reasoning = None if reasoning is None else reasoning.strip()
    # A trace needs a (non-empty) thinking section; the behaviours are looked for only there.
    behaviours = tuple(sorted(trace_behaviours(reasoning))) if reasoning else ()
    reason = "missing_behaviours" if not reasoning or len(behaviours) < filt.min_behaviours else None
    return Verdict(reason, num_tokens, reasoning, answer.strip(), behaviours)


def normalise_text(text: str) -> str:
    """Unicode-normalised (NFKC), case-folded, every whitespace run one space, stripped."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def dedup_key(reasoning: str, answer: str) -> str:
    return normalise_text(reasoning) + "\n" + normalise_text(answer)


def filter_prompt(source: str, samples: list, rewards: list[RewardOutput],
                  filt: TraceFilter) -> tuple[list[Verdict], PromptStats]:
    """Judge one prompt's responses (``Sample``s: ``text``, ``token_ids``, ``finish_reason``);
    return the kept verdicts, in sample order, and the prompt's statistics."""
    stats = PromptStats(source, sampled=len(samples))
    seen: set[str] = set()
    kept = []
    for sample, reward in zip(samples, rewards, strict=True):
        verdict = judge_trace(sample.text, len(sample.token_ids), sample.finish_reason, reward, filt)
        if verdict.reason is None:
            key = dedup_key(verdict.reasoning, verdict.answer)
            if key in seen:
                verdict = replace(verdict, reason="duplicate")
            seen.add(key)
        if verdict.reason is None:
            kept.append(verdict)
            stats.kept += 1
        else:
            stats.rejected[verdict.reason] += 1
            if verdict.reason == "wrong_answer":
                why = reward.reason or "no reason given"
                stats.reward_reasons[why] = stats.reward_reasons.get(why, 0) + 1
    return kept, stats


def long_cot_row(example: Example, verdict: Verdict, image_paths: list[str]) -> dict:
    """One row of the documented format: the prompt, then the teacher's verified trace."""
    trace = {"role": "assistant", "reasoning_content": verdict.reasoning, "content": verdict.answer}
    row = {"messages": [*example.prompt_messages(), trace],
           "images": list(image_paths), "answer": example.answer}
    if example.difficulty is not None:
        row["difficulty"] = example.difficulty
    if example.pass_rate is not None:
        row["pass_rate"] = example.pass_rate
    # The prompt row's own extra fields (e.g. "task") stay; provenance goes under "long_cot".
    row.update({k: v for k, v in example.extra.items() if k != "long_cot"})
    row["long_cot"] = {"prompt": example.source, "response_tokens": verdict.response_tokens,
                       "behaviours": list(verdict.behaviours)}
    return row


def place_image(relative: str, in_dir: Path, out_dir: Path, images_dir: str) -> tuple[str, Optional[Path]]:
    """Where an input image goes for an output file in ``out_dir``.

    Returns (path relative to ``out_dir`` for the output row, the source file to copy there or
    None). An image already inside ``out_dir`` is referenced where it is; any other is copied
    to ``out_dir/images_dir/<its path relative to in_dir>``.
    """
    in_dir, out_dir = in_dir.resolve(), out_dir.resolve()
    source = (in_dir / relative).resolve()
    if source.is_relative_to(out_dir):
        return source.relative_to(out_dir).as_posix(), None
    inside = source.relative_to(in_dir)  # RowLoader already refused paths outside in_dir
    return (Path(images_dir) / inside).as_posix(), source


def total_stats(per_prompt: list[PromptStats]) -> dict:
    sampled = sum(p.sampled for p in per_prompt)
    kept = sum(p.kept for p in per_prompt)
    rejected = {r: sum(p.rejected[r] for p in per_prompt) for r in REJECT_REASONS}
    reward_reasons = Counter()
    for p in per_prompt:
        reward_reasons.update(p.reward_reasons)
    return {"prompts": len(per_prompt), "sampled": sampled, "kept": kept,
            "keep_rate": kept / sampled if sampled else 0.0,
            "prompts_with_kept": sum(p.kept > 0 for p in per_prompt),
            "rejected": rejected, "reward_reasons": dict(sorted(reward_reasons.items()))}


def format_summary(stats: dict) -> str:
    t = stats["totals"]
    lines = [f"long-CoT set: kept {t['kept']} of {t['sampled']} sampled traces "
             f"({100 * t['keep_rate']:.1f}%), {t['prompts_with_kept']} of {t['prompts']} prompts "
             f"have at least one",
             "rejected: " + ", ".join(f"{r} {n}" for r, n in t["rejected"].items())]
    if t["reward_reasons"]:
        lines.append("wrong answers by reward reason: "
                     + ", ".join(f"{r}: {n}" for r, n in t["reward_reasons"].items()))
    lines.append(f"rows:  {stats['output']}\nstats: {stats['stats_file']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the run

def _raw_image_paths(path: Path) -> dict[str, list[str]]:
    """Each row's ``images`` as written in the file, by the loader's ``file:line`` source."""
    from kimivl_rl.data.rows import raw_rows  # the loader's own numbering of rows

    return {f"{path}:{number}": list(row.get("images") or []) for number, row in raw_rows(path)
            if isinstance(row, dict)}


def _uses_image_files(row_format: str, image_paths: dict[str, list]) -> bool:
    """Whether the prompts are rows of the project's own format whose images are files, which the
    output rows can reuse (copied beside them); otherwise the decoded images are written out."""
    from kimivl_rl.data.formats import image_source

    def is_path(ref: object) -> bool:
        try:
            return isinstance(ref, str) and image_source(ref) == ref
        except ValueError:  # base64 of a row the loader skipped
            return False

    return row_format in (None, "messages") and all(is_path(p) for paths in image_paths.values()
                                                    for p in paths)


def _save_images(example, out_dir: Path, images_dir: str) -> list[str]:
    """The example's images, as the loader decoded them, written as PNG files named by its row."""
    paths = [f"{images_dir}/row{row_number(example.source):06d}_{i}.png"
             for i in range(1, len(example.images) + 1)]
    (out_dir / images_dir).mkdir(parents=True, exist_ok=True)
    for image, path in zip(example.images, paths):
        image.save(out_dir / path)
    return paths


def _place_images(paths: list[str], in_dir: Path, out_dir: Path, images_dir: str) -> list[str]:
    """The output row's image paths, copying the images that are not under ``out_dir``."""
    placed = []
    for relative in paths:
        new_relative, source = place_image(relative, in_dir, out_dir, images_dir)
        if source is not None:
            target = out_dir / new_relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
        placed.append(new_relative)
    return placed


def trace_filter(cfg) -> TraceFilter:
    own = cfg.long_cot_builder
    return TraceFilter(own.min_response_tokens, own.max_response_tokens, own.min_behaviours,
                       cfg.model.think_open, cfg.model.think_close)


def check_targets(out_file: Path, images_dir: Path) -> None:
    """Refuse to overwrite what kimivl-rl did not write: an existing ``out_file`` only when its
    statistics file (``<stem>.stats.json``, written with it) records its current sha256, and
    ``images_dir`` only when that file records every file in it."""
    fix = "Choose another --out file, or move that one away."
    check_replaceable_file(out_file, "--out", fix)
    copied = (read_sidecar(out_file) or {}).get("copied_images")
    check_replaceable_dir(images_dir, copied, "the image folder of --out", fix)


def build_long_cot(cfg, teacher: str, prompts_file: Path, out_file: Path) -> dict:
    """Sample, verify and filter traces from ``teacher`` for every prompt of ``prompts_file``;
    write the kept rows to ``out_file`` (JSONL) and the statistics next to it (with the file's
    sha256 and the images copied beside it, see ``check_targets``); return them.

    Sampling: ``long_cot_builder.samples_per_prompt`` responses per prompt at
    ``rollout.temperature`` / ``top_p``, up to ``rollout.max_new_tokens`` each; filters: the
    ``long_cot_builder`` section and the config's thinking markers (the teacher's).
    """
    from kimivl_rl.data.rows import RowLoader
    from kimivl_rl.system.actors import sample_and_score

    prompts_file, out_file = Path(prompts_file).resolve(), Path(out_file).resolve()
    if out_file.suffix != ".jsonl":
        raise DataError(f"{out_file}: the long-CoT set is written as JSONL (use a .jsonl name)")
    if out_file == prompts_file:
        raise DataError(f"{out_file}: the output would overwrite the prompts file")
    images_dir = out_file.stem + "_images"
    check_targets(out_file, out_file.parent / images_dir)
    loader = RowLoader.for_config(prompts_file, cfg.data, require_answer=True)
    prompts = loader.load_all()
    image_paths = _raw_image_paths(prompts_file)
    image_files = _uses_image_files(loader.format, image_paths)
    filt = trace_filter(cfg)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    partial = staging_file(out_file)
    per_prompt: list[PromptStats] = []
    k = cfg.long_cot_builder.samples_per_prompt
    try:
        with open(partial, "x", encoding="utf-8") as f:
            for chunk, samples, scores in sample_and_score(cfg, teacher, prompts, k,
                                                           cfg.rollout.temperature, "long-CoT traces"):
                for i, (example, group) in enumerate(zip(chunk, samples)):
                    kept, stats = filter_prompt(example.source, group, scores[i * k:(i + 1) * k], filt)
                    per_prompt.append(stats)
                    if kept:
                        paths = (_place_images(image_paths[example.source], prompts_file.parent,
                                               out_file.parent, images_dir) if image_files
                                 else _save_images(example, out_file.parent, images_dir))
                        for verdict in kept:
                            row = long_cot_row(example, verdict, paths)
                            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        output_sha256 = sha256_of(partial)
        os.replace(partial, out_file)  # an interrupted build never looks complete
    finally:
        partial.unlink(missing_ok=True)
    stats = {"teacher": teacher, "prompts_file": str(prompts_file), "output": str(out_file),
             "stats_file": str(sidecar_path(out_file)), SHA_KEY: output_sha256,
             "copied_images": file_hashes(out_file.parent / images_dir),
             "settings": {"samples_per_prompt": k, "temperature": cfg.rollout.temperature,
                          "top_p": cfg.rollout.top_p, "max_new_tokens": cfg.rollout.max_new_tokens,
                          "seed": cfg.seed, **asdict(filt)},
             "totals": total_stats(per_prompt), "per_prompt": [asdict(p) for p in per_prompt]}
    sidecar_path(out_file).write_text(json.dumps(stats, indent=1, ensure_ascii=False))
    log.info("long-CoT set written to %s: %s", out_file, stats["totals"])
    return stats

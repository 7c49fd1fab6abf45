"""Which rows an SFT stage trains on: its own file, rows replayed from another stage, and,
when ``keep_solved`` is set, only those of its own rows that its starting model already
answers correctly (and an evenly spaced ``unsolved_fraction`` of the others).

``keep_solved`` is the recipe's rejection sampling turned on the student: the long-CoT set
should be traces the model can follow to a verified answer. The built-in traces are written
from each task, so every one is correct; what the filter removes are prompts the starting
model cannot solve, whose answers a small model can only memorise at the cost of what it knew;
``unsolved_fraction`` keeps a few so that every kind of question still has traces to follow
(measured in docs/experiments.md, "Long-CoT trace designs"). Replayed rows are kept as they
are: they are the previous stage's own answers.

The filter runs once, on the driver's side as a Ray task with the rollout workers' resources,
and writes ``solved_rows.json`` in the stage's directory; a resumed stage reads it back, one
with another starting model or ``unsolved_fraction`` makes it again.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from kimivl_rl.config import Config, config_from_dict
from kimivl_rl.data.rows import Example, RowLoader
from kimivl_rl.infra.layout import OutputLayout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataSource:
    file: str                     # relative to data.dir
    limit: Optional[int] = None   # the first N rows only
    system_prompt: str = ""       # a system message for each of its rows ("" for none)


def stage_sources(cfg: Config, stage: str) -> list[DataSource]:
    """The stage's own training file, then its replayed rows, if any."""
    stage_cfg = getattr(cfg.sft, stage)
    sources = [DataSource(stage_cfg.train_file)]
    if stage_cfg.replay_file:
        sources.append(DataSource(stage_cfg.replay_file, stage_cfg.replay_examples,
                                  stage_cfg.replay_system_prompt))
    return sources


def with_system_prompt(example: Example, prompt: str) -> Example:
    """The example with ``prompt`` as its only system message (none when ``prompt`` is empty)."""
    if not prompt:
        return example
    turns = [m for m in example.messages if m["role"] != "system"]
    return dataclasses.replace(example, messages=[{"role": "system", "content": prompt}, *turns])


def load_source(cfg: Config, source: DataSource, keep: Optional[set[str]] = None,
                require_answer: bool = False) -> list[Example]:
    """A source's rows as examples (with its system prompt); only those in ``keep`` (by
    ``file:line``) when given."""
    loader = RowLoader.for_config(Path(cfg.data.dir) / source.file, cfg.data,
                                  require_answer=require_answer)
    rows = itertools.islice(loader, source.limit)
    return [with_system_prompt(ex, source.system_prompt) for ex in rows
            if keep is None or ex.source in keep]


def stage_examples(cfg: Config, stage: str) -> list[Example]:
    """Every example the stage trains on, in order: its own rows (those kept, with
    keep_solved), then the replayed ones."""
    own, *replayed = stage_sources(cfg, stage)
    keep = None
    if getattr(cfg.sft, stage).keep_solved:
        keep = set(json.loads(OutputLayout.of(cfg).solved_rows(stage).read_text())["kept"])
    return load_source(cfg, own, keep) + [ex for source in replayed
                                          for ex in load_source(cfg, source)]


def _kept_so_far(count: int, fraction: float) -> int:
    return int(count * fraction + 1e-9)  # 0.1 * 30 counts as 3, whatever the float rounding


def rows_to_keep(solved: list[bool], unsolved_fraction: float) -> list[int]:
    """Indices of the solved rows and of an evenly spaced ``unsolved_fraction`` of the others
    (the k-th unsolved row is kept when the running count floor(k * fraction) steps up)."""
    kept, unsolved = [], 0
    for index, ok in enumerate(solved):
        if not ok:
            unsolved += 1
            ok = _kept_so_far(unsolved, unsolved_fraction) > _kept_so_far(unsolved - 1,
                                                                          unsolved_fraction)
        if ok:
            kept.append(index)
    return kept


# ----------------------------------------------------------------------------- the filter

def ensure_solved_rows(cfg: Config, stage: str, input_model: str) -> dict:
    """Write (once) which of the stage's own rows to keep, from which ones ``input_model``
    answers correctly; return the counts."""
    from kimivl_rl.evaluation import on_rollout_resources

    path = OutputLayout.of(cfg).solved_rows(stage)
    stored = _stored_for(path, input_model, getattr(cfg.sft, stage).unsolved_fraction)
    if stored is None:
        stored = on_rollout_resources(cfg, solved_rows, stage, input_model,
                                      step=f"find the rows SFT {stage}'s starting model solves")
        if not stored["kept"]:
            raise ValueError(f"sft.{stage}.keep_solved: {input_model} answers none of the "
                             f"{stored['counts']['rows']} rows of {stored['counts']['file']} "
                             f"correctly and sft.{stage}.unsolved_fraction keeps none of the "
                             f"others, so nothing is left to train on; set "
                             f"sft.{stage}.keep_solved=false")
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(stored, indent=1))
        partial.rename(path)
    counts = stored["counts"]
    log.info("SFT %s trains on %d of the %d rows of %s: the %d its starting model solves and "
             "%d it does not", stage, counts["kept"], counts["rows"], counts["file"],
             counts["solved"], counts["kept"] - counts["solved"])
    return counts


def _stored_for(path: Path, input_model: str, unsolved_fraction: float) -> Optional[dict]:
    """What ``path`` holds if it was made for this starting model and fraction (a resumed
    stage reuses it); None when it is missing or made for others (it is made again)."""
    if not path.is_file():
        return None
    stored = json.loads(path.read_text())
    made_for = (stored.get("model"), stored.get("unsolved_fraction"))
    return stored if made_for == (input_model, unsolved_fraction) else None


def solved_rows(config: dict, stage: str, input_model: str) -> dict:
    """Greedy answers of ``input_model`` to each of the stage's own rows, in vLLM, scored by
    the answer-only reward: {"kept": ["file:line", ...], "counts": {...}}."""
    from kimivl_rl.evaluation import (generation_requests, greedy_engine, reward_inputs,
                                      score_with_limits)

    cfg = config_from_dict(config)
    own = stage_sources(cfg, stage)[0]
    examples = load_source(cfg, own, require_answer=True)
    with greedy_engine(cfg, input_model) as (engine, processor):
        samples = engine.generate(generation_requests(examples, processor), n=1,
                                  temperature=0.0, max_new_tokens=cfg.sft.eval_max_new_tokens)
    scores = score_with_limits(cfg, reward_inputs(cfg, examples, samples))
    solved = [s.score == 1.0 for s in scores]
    fraction = getattr(cfg.sft, stage).unsolved_fraction
    kept = rows_to_keep(solved, fraction)
    return {"model": input_model, "unsolved_fraction": fraction,
            "kept": [examples[i].source for i in kept],
            "counts": {"file": own.file, "rows": len(examples), "solved": sum(solved),
                       "kept": len(kept)}}

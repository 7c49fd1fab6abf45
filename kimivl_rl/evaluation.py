"""Held-out evaluation: greedy accuracy, mean@K and pass@K with standard errors, per difficulty
level, task kind and the RL tier (configured, or picked by an accuracy band); response length;
trace format; reward reasons.

One function, ``evaluation_report``, turns generated samples and their scores into the report;
the SFT stages, RL's periodic held-out evaluation and ``kimivl-rl eval`` all call it, and all
score through ``TimedScorer``, the reward service's time-limited path (``reward.function``,
``numeric_tolerance``, ``timeout_s``).
"""
from __future__ import annotations

import math
from collections import defaultdict
from contextlib import contextmanager
from functools import partial
from typing import Optional, Sequence

import numpy as np

from kimivl_rl.data.rows import Example
from kimivl_rl.data.traces import shows_work
from kimivl_rl.reward.contract import RewardInput, RewardOutput
from kimivl_rl.reward.extract import split_thinking, thinks_then_answers
from kimivl_rl.reward.service import count_reasons
from kimivl_rl.types import GenerationRequest, Sample

ALL = "all"
TIER = "tier"
DIFFICULTY = "difficulty"


def generation_requests(examples: list[Example], processor) -> list[GenerationRequest]:
    return [GenerationRequest(
        prompt=processor.apply_chat_template(ex.prompt_messages(), tokenize=False,
                                             add_generation_prompt=True),
        images=ex.images, request_id=ex.source) for ex in examples]


def shows_trace_format(text: str, think_open: str, think_close: str) -> bool:
    reasoning, _ = split_thinking(text, think_open, think_close)
    return thinks_then_answers(text, think_open, think_close) and shows_work(reasoning)


def reward_inputs(cfg, examples: Sequence[Example],
                  groups: Sequence[Sequence[Sample]]) -> list[RewardInput]:
    """One reward item per sample, group by group, as the reward service scores them."""
    return [RewardInput(response=s.text, reference=ex.answer, prompt_id=ex.source,
                        task=str(ex.extra.get("task", "")), think_open=cfg.model.think_open,
                        think_close=cfg.model.think_close)
            for ex, group in zip(examples, groups) for s in group]


def score_with_limits(cfg, items: list[RewardInput]) -> list[RewardOutput]:
    """Score in this process through the reward service's scorer: same function, same limits."""
    from kimivl_rl.reward.scoring import TimedScorer

    with TimedScorer(cfg.reward.function, timeout_s=cfg.reward.timeout_s,
                     numeric_tolerance=cfg.reward.numeric_tolerance) as scorer:
        return scorer.score_batch(items)


# ----------------------------------------------------------------------------- the report

def _mean_se(values: Sequence[float], binary: bool) -> tuple[float, float]:
    """Mean and standard error of per-prompt values: binomial ``sqrt(p (1 - p) / n)`` for 0/1
    outcomes, the sample std over ``sqrt(n)`` for per-prompt means (mean@K)."""
    n = len(values)
    if n == 0:
        return 0.0, 0.0
    mean = float(np.mean(values))
    if binary:
        return mean, math.sqrt(mean * (1 - mean) / n)
    return mean, float(np.std(values, ddof=1) / math.sqrt(n)) if n > 1 else 0.0


def _slice_stats(rows: list[int], correct: list[float], lengths: list[int], traces: list[bool],
                 group_correct: Optional[list[list[float]]],
                 group_lengths: Optional[list[list[int]]]) -> dict:
    stats = {"n": len(rows)}
    stats["greedy"], stats["greedy_se"] = _mean_se([correct[i] for i in rows], binary=True)
    chosen = [lengths[i] for i in rows]
    stats["tokens_mean"] = float(np.mean(chosen)) if chosen else 0.0
    stats["tokens_p90"] = float(np.percentile(chosen, 90)) if chosen else 0.0
    stats["trace_format"] = float(np.mean([traces[i] for i in rows])) if rows else 0.0
    if group_correct is not None:
        per_prompt = [float(np.mean(group_correct[i])) for i in rows]
        stats["mean_at_k"], stats["mean_at_k_se"] = _mean_se(per_prompt, binary=False)
        stats["pass_at_k"], stats["pass_at_k_se"] = _mean_se(
            [float(max(group_correct[i]) >= 1.0) for i in rows], binary=True)
        spreads = [(max(g) - min(g)) / max(1e-9, float(np.mean(g)))
                   for g in (group_lengths[i] for i in rows)]
        # (longest - shortest) / mean of one prompt's samples: the length penalty's room
        stats["sampled_tokens_mean"] = float(np.mean([np.mean(group_lengths[i]) for i in rows])) \
            if rows else 0.0
        stats["length_spread"] = float(np.mean(spreads)) if spreads else 0.0
    return stats


def in_tier(example: Example, tier: dict) -> bool:
    """Whether a row belongs to the tier (``labels_in_tier`` on its labels)."""
    return labels_in_tier(example.difficulty, example.extra.get("task"), tier)


def labels_in_tier(difficulty: Optional[float], task: Optional[str], tier: dict) -> bool:
    """Whether a row of these labels belongs to the tier: its difficulty among
    ``tier["difficulties"]`` (None admits any) and its task kind among ``tier["tasks"]`` (an
    empty list admits any)."""
    levels, tasks = tier.get("difficulties"), tier.get("tasks") or []
    level_ok = levels is None or (difficulty is not None and int(difficulty) in levels)
    return level_ok and (not tasks or task in tasks)


def _slices(examples: Sequence[Example]) -> dict[str, list[int]]:
    """Row indices of every slice: all, each difficulty level, each task kind."""
    slices: dict[str, list[int]] = defaultdict(list)
    for i, ex in enumerate(examples):
        slices[ALL].append(i)
        level = "unlabelled" if ex.difficulty is None else str(int(ex.difficulty))
        slices[f"{DIFFICULTY} {level}"].append(i)
        slices[f"task {ex.extra.get('task', 'unlabelled')}"].append(i)
    return dict(sorted(slices.items(), key=lambda kv: (kv[0] != ALL, kv[0])))


def by_difficulty(slices: dict[str, dict]) -> dict[int, dict]:
    """A report's slices of labelled difficulty levels, by level, in order."""
    levels = [(name.split(" ", 1)[1], stats) for name, stats in slices.items()
              if name.startswith(f"{DIFFICULTY} ")]
    return dict(sorted(((int(level), stats) for level, stats in levels if level.isdigit()),
                       key=lambda kv: kv[0]))


def tier_of(cfg) -> dict:
    """The configured tier: its difficulty levels (None: any), or with ``eval.tier_difficulties:
    auto`` the accuracy band that ``settle_tier`` picks them by; and its task kinds."""
    ev = cfg.eval
    levels = ({"band": [ev.tier_min_accuracy, ev.tier_max_accuracy]} if ev.tier_difficulties == "auto"
              else {"difficulties": list(ev.tier_difficulties) or None})
    return {**levels, "tasks": list(ev.tier_tasks)}


def difficulties_in_band(accuracy: dict[int, float], low: float, high: float) -> list[int]:
    """The tier rule: the levels whose greedy accuracy lies within [low, high], neither hopeless
    nor saturated, where a group's samples disagree often enough for group-relative RL to learn."""
    return sorted(level for level, value in accuracy.items() if low <= value <= high)


def settle_tier(tier: Optional[dict], accuracy: dict[int, float]) -> Optional[dict]:
    """``tier`` with its levels picked from ``accuracy`` (level -> greedy accuracy) by its band,
    where it has a band and no levels yet; the accuracies that picked them go with it. The first
    evaluation given the band settles it; later ones are given the settled tier."""
    if not tier or "band" not in tier or "difficulties" in tier:
        return tier
    return {**tier, "difficulties": difficulties_in_band(accuracy, *tier["band"]),
            "accuracy_by_difficulty": {str(level): value for level, value in accuracy.items()}}


def tier_name(tier: dict) -> str:
    """``difficulty 2, 3; tasks count, colour``-style name of a tier, for tables and summaries."""
    levels, tasks = tier.get("difficulties"), tier.get("tasks") or []
    parts = [] if levels is None else [f"difficulty {', '.join(map(str, levels)) or 'none'}"]
    return "; ".join(parts + ([f"tasks {', '.join(tasks)}"] if tasks else [])) or "all"


def evaluation_report(examples: Sequence[Example], greedy: Sequence[Sample],
                      greedy_scores: Sequence[RewardOutput], *, think_open: str, think_close: str,
                      tier: Optional[dict] = None, sampled: Optional[Sequence[Sequence[Sample]]] = None,
                      sampled_scores: Optional[Sequence[RewardOutput]] = None) -> dict:
    """The report of one evaluation. ``sampled`` holds K samples per example (may be None) and
    ``sampled_scores`` their scores, flat, group by group. A ``tier`` with a band is settled on
    this evaluation's per-difficulty accuracy (``settle_tier``)."""
    correct = [float(s.score) for s in greedy_scores]
    lengths = [len(s.token_ids) for s in greedy]
    traces = [shows_trace_format(s.text, think_open, think_close) for s in greedy]
    group_correct = group_lengths = None
    k = len(sampled[0]) if sampled else 0
    if sampled:
        flat = [float(s.score) for s in sampled_scores]
        group_correct = _per_prompt(flat, k)
        group_lengths = [[len(s.token_ids) for s in group] for group in sampled]
    stats = partial(_slice_stats, correct=correct, lengths=lengths, traces=traces,
                    group_correct=group_correct, group_lengths=group_lengths)
    slices = {name: stats(rows) for name, rows in _slices(examples).items()}
    tier = settle_tier(tier, {level: s["greedy"] for level, s in by_difficulty(slices).items()})
    if tier:
        slices[TIER] = stats([i for i, ex in enumerate(examples) if in_tier(ex, tier)])
    return {"examples": len(examples), "samples_per_prompt": k, "tier": tier or {},
            "slices": slices, "greedy_reasons": count_reasons(s.reason for s in greedy_scores),
            "prompts": {"score": correct, "difficulty": [ex.difficulty for ex in examples],
                        "task": [ex.extra.get("task") for ex in examples]}}


# ----------------------------------------------------------------------------- comparing two

def paired_change(before: Sequence[float], after: Sequence[float]) -> tuple[float, float]:
    """The mean of ``after - before`` over the same prompts and its standard error: the sample
    std of the per-prompt differences over sqrt(n). Two models scored on one set of prompts
    share each prompt's difficulty; combining their accuracies' SEs as if the samples were
    independent overstates the difference's error."""
    if len(before) != len(after):
        raise ValueError(f"{len(before)} scores before, {len(after)} after: not the same prompts")
    diffs = np.asarray(after, dtype=np.float64) - np.asarray(before, dtype=np.float64)
    if len(diffs) < 2:
        return float(diffs.mean()) if len(diffs) else 0.0, 0.0
    return float(diffs.mean()), float(diffs.std(ddof=1) / math.sqrt(len(diffs)))


def step_change(before: dict, after: dict, tier: Optional[dict]) -> Optional[dict]:
    """The change of greedy accuracy from one report to another on all prompts and on the
    ``tier``'s (``{"all": {"n", "change", "se"}, "tier": ...}``); None where the two were not
    scored on the same prompts, as far as their count, difficulties and task kinds tell (or a
    report predates per-prompt scores)."""
    first, second = before.get("prompts"), after.get("prompts")
    same = first and second and all(first[key] == second[key] for key in ("difficulty", "task"))
    if not same:
        return None
    rows = {ALL: list(range(len(first["score"])))}
    if tier:
        rows[TIER] = [i for i, (level, task) in enumerate(zip(first["difficulty"], first["task"]))
                      if labels_in_tier(level, task, tier)]
    changes = {}
    for name, chosen in rows.items():
        change, se = paired_change([first["score"][i] for i in chosen],
                                   [second["score"][i] for i in chosen])
        changes[name] = {"n": len(chosen), "change": change, "se": se}
    return changes


def format_change(change: dict) -> str:
    """``+0.120±0.031 (+3.9 SE)``: a paired change, its standard error and their ratio."""
    ratio = f" ({change['change'] / change['se']:+.1f} SE)" if change["se"] > 0 else ""
    return f"{change['change']:+.3f}±{change['se']:.3f}{ratio}"


def response_rows(examples: Sequence[Example], greedy: Sequence[Sample],
                  greedy_scores: Sequence[RewardOutput],
                  sampled_scores: Optional[Sequence[RewardOutput]] = None) -> list[dict]:
    """What the model wrote, prompt by prompt: the row it came from (``file:line``), the
    reference answer, the greedy response with the answer extracted from it, its score, reason
    and tokens, and the scores of the samples (``sampled_scores``: K per prompt, flat)."""
    k = len(sampled_scores) // max(1, len(examples)) if sampled_scores else 0
    groups = _per_prompt([s.score for s in sampled_scores], k) if k else [None] * len(examples)
    return [{"source": ex.source, "reference": ex.answer, "difficulty": ex.difficulty,
             "task": ex.extra.get("task"), "response": out.text, "extracted": score.extracted,
             "score": score.score, "reason": score.reason, "tokens": len(out.token_ids),
             **({"sample_scores": group} if k else {})}
            for ex, out, score, group in zip(examples, greedy, greedy_scores, groups, strict=True)]


def _per_prompt(flat: Sequence, k: int) -> list:
    """Values listed group by group, K per prompt, as one list per prompt."""
    return [list(flat[i:i + k]) for i in range(0, len(flat), k)]


def format_report(report: dict) -> str:
    """A table of the report's slices, one line each."""
    k = report["samples_per_prompt"]
    labels = {name: f"tier: {tier_name(report['tier'])}" if name == TIER else name
              for name in report["slices"]}
    width = max(len(label) for label in labels.values())
    head = f"{'slice':<{width}} {'n':>4} {'greedy':>13}"
    if k:
        head += f" {f'mean@{k}':>13} {f'pass@{k}':>13} {'spread':>6}"
    lines = [head + f" {'tokens':>6} {'p90':>5} {'format':>6}"]
    for name, s in report["slices"].items():
        line = f"{labels[name]:<{width}} {s['n']:>4} {s['greedy']:>6.3f}±{s['greedy_se']:.3f}"
        if k:
            line += (f" {s['mean_at_k']:>6.3f}±{s['mean_at_k_se']:.3f}"
                     f" {s['pass_at_k']:>6.3f}±{s['pass_at_k_se']:.3f} {s['length_spread']:>6.2f}")
        lines.append(line + f" {s['tokens_mean']:>6.1f} {s['tokens_p90']:>5.0f} "
                            f"{s['trace_format']:>6.2f}")
    reasons = ", ".join(f"{r}: {n}" for r, n in report["greedy_reasons"].items())
    lines.append(f"greedy reward reasons: {reasons}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- running it

def evaluate_with_engine(cfg, engine, processor, examples: list[Example], samples: int = 0,
                         max_new_tokens: Optional[int] = None, responses: bool = False) -> dict:
    """Greedy answers (and ``samples`` more at the rollout temperature) from ``engine``, scored
    in this process through the time-limited scorer, as a report; with ``responses`` it holds
    them too, prompt by prompt (``response_rows``)."""
    max_new_tokens = max_new_tokens or cfg.rollout.max_new_tokens
    requests = generation_requests(examples, processor)
    greedy = [g[0] for g in engine.generate(requests, n=1, temperature=0.0,
                                            max_new_tokens=max_new_tokens)]
    sampled = engine.generate(requests, n=samples, temperature=cfg.rollout.temperature,
                              top_p=cfg.rollout.top_p, max_new_tokens=max_new_tokens,
                              seed=cfg.seed) if samples else None
    greedy_scores = score_with_limits(cfg, reward_inputs(cfg, examples, [[g] for g in greedy]))
    sampled_scores = score_with_limits(cfg, reward_inputs(cfg, examples, sampled)) if sampled else None
    report = evaluation_report(examples, greedy, greedy_scores, think_open=cfg.model.think_open,
                               think_close=cfg.model.think_close, tier=tier_of(cfg),
                               sampled=sampled, sampled_scores=sampled_scores)
    if responses:
        report["responses"] = response_rows(examples, greedy, greedy_scores, sampled_scores)
    return report


def evaluation_rows(cfg, data_file: str, limit: int) -> list[Example]:
    """The first ``limit`` rows of ``data_file``; every row is read and checked, and each needs
    a reference ``answer``."""
    from kimivl_rl.data.rows import RowLoader

    return RowLoader.for_config(data_file, cfg.data, require_answer=True).load_all()[:limit]


def evaluate_model(config: dict, model_dir: str, data_file: str, limit: int, samples: int,
                   max_new_tokens: Optional[int] = None, responses: bool = False) -> dict:
    """``evaluate_with_engine`` on the first ``limit`` rows of ``data_file`` with a vLLM engine
    of its own for ``model_dir`` (a model, or an RL checkpoint): the body of a Ray task
    (``on_rollout_resources``)."""
    from kimivl_rl.config import config_from_dict

    cfg = config_from_dict(config)
    examples = evaluation_rows(cfg, data_file, limit)
    with model_directory(model_dir) as model, greedy_engine(cfg, model) as (engine, processor):
        return evaluate_with_engine(cfg, engine, processor, examples, samples, max_new_tokens,
                                    responses)


@contextmanager
def model_directory(path: str):
    """``path`` itself, or for an RL checkpoint a temporary Hugging Face export of it."""
    import tempfile

    from kimivl_rl.models.loading import export_rl_checkpoint, is_rl_checkpoint

    if not is_rl_checkpoint(path):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="kimivl-eval-") as tmp:
        yield str(export_rl_checkpoint(path, tmp))


@contextmanager
def greedy_engine(cfg, model_dir: str):
    """A vLLM engine and processor for ``model_dir`` with the config's settings, shut down after."""
    from transformers import AutoProcessor

    from kimivl_rl.rollout.vllm_engine import VLLMEngine, engine_options

    engine = VLLMEngine(engine_options(cfg, model_dir))
    try:
        yield engine, AutoProcessor.from_pretrained(
            model_dir, trust_remote_code=cfg.model.trust_remote_code)
    finally:
        engine.shutdown()


def on_rollout_resources(cfg, task, *args, step: str):
    """Run ``task(config_dict, *args)`` as a Ray task with a rollout worker's resources (on a GPU
    cluster the driver's node may have no GPU) and wait for it under the call timeout."""
    import ray

    from kimivl_rl.config import config_to_dict
    from kimivl_rl.infra.allocator import with_allocator
    from kimivl_rl.infra.remote import wait_one

    gpus = cfg.rollout.tensor_parallel_size if cfg.cluster.use_gpu else 0
    # max_calls=1: a fresh process per task. A vLLM engine sizes its KV cache from its process's
    # RSS, which the previous task's freed cache can still fill (tcmalloc keeps freed memory).
    remote = ray.remote(max_calls=1)(task).options(**with_allocator(
        cfg, dict(num_cpus=cfg.cluster.rollout_cpus, num_gpus=gpus)))
    return wait_one(remote.remote(config_to_dict(cfg), *args), "evaluation", step,
                    cfg.cluster.call_timeout_s)

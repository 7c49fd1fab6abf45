"""What a run reports from its files: RL's summary from its metrics, the run's table of
held-out accuracy per finished stage, overall and per difficulty level with standard errors, and
each stage's change over the one before on the same prompts (``kimivl-rl run`` prints it,
``format_summary``)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from kimivl_rl.evaluation import ALL, TIER, by_difficulty, format_change, step_change, tier_name
from kimivl_rl.infra.layout import OutputLayout
from kimivl_rl.infra.metrics import read_jsonl

STAGE_TITLES = {"joint": "joint SFT", "long_cot": "long-CoT SFT", "rl": "RL"}
EVAL_KEYS = ("step", "eval_reward", "eval_reward_se", "eval_tier_reward", "eval_tier_reward_se",
             "eval_tier_n", "eval_response_length", "eval_trace_format")


def rl_summary(cfg, input_model: str) -> dict:
    """RL's summary from its metrics: held-out accuracy (all prompts and the tier, as its
    iteration-0 evaluation settled it) and length at the start, when the length penalty switches
    on and at the end, and the change from start to end with its paired SE; training signal; the
    last evaluation's whole report (``eval``)."""
    records = read_jsonl(OutputLayout.of(cfg).metrics("rl"))
    evals = [r for r in records if "eval_reward" in r]
    trains = [r for r in records if "reward_mean" in r]
    start = cfg.rl.length_penalty_start_iteration
    before_penalty = [r for r in evals if r["step"] <= start]
    tier = evals[0]["eval_report"]["tier"] if evals else None
    pick = lambda r: {k: r.get(k) for k in EVAL_KEYS} if r else None  # noqa: E731
    return {"input_model": input_model, "output_model": str(OutputLayout.of(cfg).model("rl")),
            "iterations": cfg.rl.iterations,
            "tier": tier,
            "change": step_change(evals[0]["eval_report"], evals[-1]["eval_report"], tier)
            if evals else None,
            "eval_start": pick(evals[0] if evals else None),
            "eval_penalty_start": pick(before_penalty[-1] if before_penalty and start < cfg.rl.iterations
                                       else None),
            "eval_end": pick(evals[-1] if evals else None),
            "eval": evals[-1]["eval_report"] if evals else None,
            "length_penalty_start_iteration": start,
            "train_reward_start": trains[0]["reward_mean"] if trains else None,
            "train_reward_end": trains[-1]["reward_mean"] if trains else None,
            "informative_group_fraction_mean":
                sum(r["informative_group_fraction"] for r in trains) / max(1, len(trains)),
            "iterations_without_update": sum(r["learner_responses"] == 0 for r in trains)}


def _read_json(path: Path) -> Optional[dict]:
    return json.loads(path.read_text()) if path.is_file() else None


def _accuracy(stats: dict) -> dict:
    return {"n": stats["n"], "accuracy": stats["greedy"], "accuracy_se": stats["greedy_se"]}


def stage_row(title: str, report: dict) -> dict:
    """A stage's (or model's) row of the run's table from its held-out report: greedy accuracy
    ± SE on all prompts and per difficulty level, mean response tokens, trace format."""
    every, levels = report["slices"][ALL], by_difficulty(report["slices"])
    return {"stage": title, **_accuracy(every),
            "difficulty": {str(level): _accuracy(s) for level, s in levels.items()},
            "response_tokens": every["tokens_mean"], "trace_format": every["trace_format"]}


def stage_steps(reports: list[tuple[str, dict]], tier: Optional[dict]) -> list[dict]:
    """Each stage's change over the one before it (``step_change``: on all prompts and the
    tier's, with paired SEs; None where they were not scored on the same prompts)."""
    return [{"from": before, "to": after, "change": step_change(first, second, tier)}
            for (before, first), (after, second) in zip(reports, reports[1:])]


def run_summary(cfg) -> dict:
    """A row per finished stage (``stage_row``; RL's from its last evaluation), each stage's
    change over the one before on RL's tier (``stage_steps``), and RL's own summary
    (``rl_summary``). Stages that have not run are left out."""
    layout = OutputLayout.of(cfg)
    finished = {stage: done for stage in STAGE_TITLES
                if (done := _read_json(layout.stage_summary(stage)))}
    reports = [(STAGE_TITLES[stage], done["eval"]) for stage, done in finished.items()]
    summary = {"stages": [stage_row(title, report) for title, report in reports],
               "steps": stage_steps(reports, finished["rl"]["tier"] if "rl" in finished else None)}
    if "rl" in finished:
        summary["rl"] = finished["rl"]
    return summary


# ----------------------------------------------------------------------------- printing

def _cell(accuracy: Optional[dict]) -> str:
    return f"{accuracy['accuracy']:.3f}±{accuracy['accuracy_se']:.3f}" if accuracy else "-"


def _change(before: float, after: float, change: Optional[dict]) -> str:
    return f"{before:.3f} -> {after:.3f}: {format_change(change) if change else f'{after - before:+.3f}'}"


def format_stages(rows: list[dict]) -> str:
    """The stages' table: one row each, held-out greedy accuracy ± one standard error on all
    prompts and on each difficulty level any stage has (d1, d2, ...), tokens, trace format."""
    levels = sorted({level for row in rows for level in row["difficulty"]}, key=int)
    names = ["all", *(f"d{lv}" for lv in levels)]
    lines = ["held-out greedy accuracy ± SE, all prompts and by difficulty level:",
             f"{'stage':<13} {'n':>4}" + "".join(f" {name:>11}" for name in names)
             + f" {'tokens':>6} {'format':>6}"]
    for row in rows:
        cells = [_cell(row), *(_cell(row["difficulty"].get(lv)) for lv in levels)]
        lines.append(f"{row['stage']:<13} {row['n']:>4}" + "".join(f" {cell:>11}" for cell in cells)
                     + f" {row['response_tokens']:>6.1f} {row['trace_format']:>6.2f}")
    return "\n".join(lines)


def tier_reason(tier: dict) -> str:
    """Why the tier holds the rows it does: the config names it, or its band picked it from the
    starting model's accuracy per level (all of them shown)."""
    if "band" not in tier:
        return "named in the config (eval.tier_difficulties, eval.tier_tasks)"
    low, high = tier["band"]
    accuracy = ", ".join(f"d{lv} {value:.3f}" for lv, value in tier["accuracy_by_difficulty"].items())
    return (f"picked by rule: RL's starting greedy accuracy within {low:.2f}..{high:.2f} "
            f"(iteration 0: {accuracy or 'no difficulty labels'})")


def format_rl(rl: dict) -> str:
    """RL's headline: its held-out gain on all prompts and on the tier (with why the tier is
    what it is), the length penalty's effect, its training signal."""
    first, last, mid, tier = rl["eval_start"], rl["eval_end"], rl["eval_penalty_start"], rl["tier"]
    lines = [f"RL tier: {tier_name(tier)}, {tier_reason(tier)}",
             f"RL over {rl['iterations']} iterations, held-out greedy accuracy: all "
             + _change(first["eval_reward"], last["eval_reward"], (rl["change"] or {}).get(ALL))]
    if last["eval_tier_n"]:
        lines.append(f"  tier ({tier_name(tier)}; n={last['eval_tier_n']}): "
                     + _change(first["eval_tier_reward"], last["eval_tier_reward"],
                               (rl["change"] or {}).get(TIER)))
    if mid:
        drop = 1 - last["eval_response_length"] / max(1e-9, mid["eval_response_length"])
        lines.append(f"  length penalty on after iteration {rl['length_penalty_start_iteration']}: "
                     f"response tokens {mid['eval_response_length']:.1f} -> "
                     f"{last['eval_response_length']:.1f} ({-drop:+.0%}), accuracy "
                     f"{mid['eval_reward']:.3f} -> {last['eval_reward']:.3f}")
    lines.append(f"  informative groups {rl['informative_group_fraction_mean']:.2f} on average; "
                 f"iterations without an update: {rl['iterations_without_update']}")
    return "\n".join(lines)


def format_steps(steps: list[dict], tier: Optional[dict]) -> str:
    """One line per step: the change on all prompts and on the tier, ± the SE of the per-prompt
    differences."""
    lines = ["each stage over the one before, on the same prompts (change ± paired SE):"]
    for step in steps:
        change, head = step["change"], f"  {step['from']} -> {step['to']}: "
        if change is None:
            lines.append(head + "not scored on the same prompts")
            continue
        parts = [f"all {format_change(change[ALL])}"]
        if change.get(TIER, {}).get("n"):
            parts.append(f"tier ({tier_name(tier)}; n={change[TIER]['n']}) {format_change(change[TIER])}")
        lines.append(head + "; ".join(parts))
    return "\n".join(lines)


def format_summary(summary: dict) -> str:
    """The run's summary as ``kimivl-rl run`` prints it: the stages' table, each stage's change
    over the one before, then RL's headline."""
    parts = [format_stages(summary["stages"])]
    if summary.get("steps"):
        parts.append(format_steps(summary["steps"], (summary.get("rl") or {}).get("tier")))
    if summary.get("rl"):
        parts.append(format_rl(summary["rl"]))
    return "\n".join(parts)

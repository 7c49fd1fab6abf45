"""What a run reports from its files: RL's summary from its metrics, and the run's table of
held-out accuracy per finished stage (``kimivl-rl run`` prints it, ``pipeline.format_summary``)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from kimivl_rl.evaluation import tier_of
from kimivl_rl.infra.layout import OutputLayout
from kimivl_rl.infra.metrics import read_jsonl

STAGE_TITLES = {"joint": "joint SFT", "long_cot": "long-CoT SFT", "rl": "RL"}
EVAL_KEYS = ("step", "eval_reward", "eval_reward_se", "eval_tier_reward", "eval_tier_reward_se",
             "eval_tier_n", "eval_response_length", "eval_trace_format")


def rl_summary(cfg, input_model: str) -> dict:
    """RL's summary from its metrics: held-out accuracy (all prompts and the tier) and length
    at the start, when the length penalty switches on and at the end; training signal."""
    records = read_jsonl(OutputLayout.of(cfg).metrics("rl"))
    evals = [r for r in records if "eval_reward" in r]
    trains = [r for r in records if "reward_mean" in r]
    start = cfg.rl.length_penalty_start_iteration
    before_penalty = [r for r in evals if r["step"] <= start]
    pick = lambda r: {k: r.get(k) for k in EVAL_KEYS} if r else None  # noqa: E731
    return {"input_model": input_model, "output_model": str(OutputLayout.of(cfg).model("rl")),
            "iterations": cfg.rl.iterations, "tier": tier_of(cfg),
            "eval_start": pick(evals[0] if evals else None),
            "eval_penalty_start": pick(before_penalty[-1] if before_penalty and start < cfg.rl.iterations
                                       else None),
            "eval_end": pick(evals[-1] if evals else None),
            "length_penalty_start_iteration": start,
            "train_reward_start": trains[0]["reward_mean"] if trains else None,
            "train_reward_end": trains[-1]["reward_mean"] if trains else None,
            "informative_group_fraction_mean":
                sum(r["informative_group_fraction"] for r in trains) / max(1, len(trains)),
            "iterations_without_update": sum(r["learner_responses"] == 0 for r in trains)}


def _read_json(path: Path) -> Optional[dict]:
    return json.loads(path.read_text()) if path.is_file() else None


def run_summary(cfg) -> dict:
    """Held-out accuracy, mean response length and trace format after each finished stage, and
    RL's own summary (``rl_summary``). Stages that have not run are left out."""
    layout = OutputLayout.of(cfg)
    rows = []
    for stage in ("joint", "long_cot"):
        finished = _read_json(layout.stage_summary(stage))
        if finished:
            ev = finished["eval"]["slices"]["all"]
            rows.append({"stage": STAGE_TITLES[stage], "accuracy": ev["greedy"],
                         "response_tokens": ev["tokens_mean"], "trace_format": ev["trace_format"]})
    summary = {"stages": rows}
    rl = _read_json(layout.stage_summary("rl"))
    if rl:
        end = rl["eval_end"]
        rows.append({"stage": STAGE_TITLES["rl"], "accuracy": end["eval_reward"],
                     "response_tokens": end["eval_response_length"],
                     "trace_format": end["eval_trace_format"]})
        summary["rl"] = rl
    return summary

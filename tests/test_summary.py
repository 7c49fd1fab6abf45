"""The run's summary from hand-made stage reports and RL metrics (no engine, no Ray): one row per
stage with accuracy ± SE on all prompts and per difficulty level, the same numbers in
summary.json, and RL's headline on the tier its iteration-0 evaluation settled, with why."""
from __future__ import annotations

import json

from kimivl_rl.config import load_config
from kimivl_rl.summary import format_summary, rl_summary, run_summary, tier_reason
from kimivl_rl.system.controller import starting_tier

SETTLED = {"band": [0.2, 0.8], "tasks": [], "difficulties": [2],
           "accuracy_by_difficulty": {"1": 0.9, "2": 0.5}}


def part(n: int, greedy: float, se: float, tokens: float = 0.0, trace: float = 0.0) -> dict:
    return {"n": n, "greedy": greedy, "greedy_se": se, "tokens_mean": tokens, "trace_format": trace}


def report(every: dict, levels: dict[int, dict], tier: dict | None = None) -> dict:
    """A held-out report as ``evaluation_report`` writes one, with only what the summary reads;
    its per-prompt scores put each level's right answers on that level's first prompts."""
    slices = {"all": every, **{f"difficulty {lv}": s for lv, s in levels.items()},
              "task count": part(1, 0.0, 0.0)}
    if tier:
        slices["tier"] = levels[tier["difficulties"][0]]
    scores = [float(i < round(s["n"] * s["greedy"])) for s in levels.values() for i in range(s["n"])]
    difficulty = [lv for lv, s in levels.items() for _ in range(s["n"])]
    return {"examples": every["n"], "tier": tier or {}, "slices": slices,
            "prompts": {"score": scores, "difficulty": difficulty, "task": ["arith"] * len(scores)}}


JOINT = report(part(100, 0.5, 0.05, 6.6, 0.0), {1: part(50, 0.9, 0.042), 2: part(50, 0.1, 0.042)})
LONG_COT = report(part(100, 0.6, 0.049, 138.0, 0.99), {1: part(50, 0.7, 0.065), 2: part(50, 0.5, 0.071)})
RL_START = report(part(100, 0.7, 0.046, 130.0, 1.0), {1: part(50, 0.9, 0.042), 2: part(50, 0.5, 0.071)},
                  SETTLED)
RL_END = report(part(100, 0.8, 0.04, 70.5, 0.97), {1: part(50, 0.9, 0.042), 2: part(50, 0.7, 0.065)},
                SETTLED)


def eval_record(step: int, rep: dict) -> dict:
    every, tier = rep["slices"]["all"], rep["slices"]["tier"]
    return {"step": step, "eval_reward": every["greedy"], "eval_reward_se": every["greedy_se"],
            "eval_response_length": every["tokens_mean"], "eval_trace_format": every["trace_format"],
            "eval_tier_reward": tier["greedy"], "eval_tier_reward_se": tier["greedy_se"],
            "eval_tier_n": tier["n"], "eval_report": rep}


def train_record(step: int) -> dict:
    return {"step": step, "reward_mean": 0.1 * step, "informative_group_fraction": 0.5,
            "learner_responses": 8}


def write_run(tmp_path):
    """A finished run's files: both SFT stages' summaries, RL's metrics and its summary."""
    cfg = load_config("configs/tiny.yaml", [f"output.dir={tmp_path}", "rl.iterations=2",
                                            "rl.length_penalty_start_iteration=1", "rl.eval_every=1"])
    for stage, rep in (("sft_joint", JOINT), ("sft_long_cot", LONG_COT)):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "summary.json").write_text(json.dumps({"stage": stage, "eval": rep}))
    (tmp_path / "rl").mkdir()
    records = [eval_record(0, RL_START), {**train_record(1), **eval_record(1, RL_START)},
               {**train_record(2), **eval_record(2, RL_END)}]
    (tmp_path / "rl" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "rl" / "summary.json").write_text(json.dumps(rl_summary(cfg, "long_cot/model")))
    return cfg


def test_rl_summary_keeps_the_settled_tier_and_the_last_report(tmp_path):
    write_run(tmp_path)
    rl = json.loads((tmp_path / "rl" / "summary.json").read_text())
    assert rl["tier"] == SETTLED and rl["eval"] == RL_END
    assert (rl["eval_start"]["eval_tier_reward"], rl["eval_end"]["eval_tier_reward"]) == (0.5, 0.7)
    assert rl["eval_penalty_start"]["step"] == 1 and rl["iterations_without_update"] == 0


def test_a_resumed_run_reports_on_the_tier_iteration_0_settled(tmp_path):
    cfg = write_run(tmp_path)
    with (tmp_path / "rl" / "metrics.jsonl").open("a") as f:  # a rerun's later evaluation
        f.write(json.dumps(eval_record(3, report(part(1, 1.0, 0.0), {1: part(1, 1.0, 0.0)},
                                                 {**SETTLED, "difficulties": [1]}))) + "\n")
    assert starting_tier(cfg) == SETTLED


def test_the_table_holds_every_stage_overall_and_per_difficulty(tmp_path):
    summary = run_summary(write_run(tmp_path))
    assert [row["stage"] for row in summary["stages"]] == ["joint SFT", "long-CoT SFT", "RL"]
    assert summary["stages"][2] == {
        "stage": "RL", "n": 100, "accuracy": 0.8, "accuracy_se": 0.04,
        "difficulty": {"1": {"n": 50, "accuracy": 0.9, "accuracy_se": 0.042},
                       "2": {"n": 50, "accuracy": 0.7, "accuracy_se": 0.065}},
        "response_tokens": 70.5, "trace_format": 0.97}
    assert json.loads(json.dumps(summary)) == summary  # summary.json holds the same numbers
    assert format_summary(summary).splitlines() == [
        "held-out greedy accuracy ± SE, all prompts and by difficulty level:",
        "stage            n         all          d1          d2 tokens format",
        "joint SFT      100 0.500±0.050 0.900±0.042 0.100±0.042    6.6   0.00",
        "long-CoT SFT   100 0.600±0.049 0.700±0.065 0.500±0.071  138.0   0.99",
        "RL             100 0.800±0.040 0.900±0.042 0.700±0.065   70.5   0.97",
        # Hand-computed from the per-prompt differences: joint -> long-CoT has 20 prompts +1 and
        # 10 at -1 of 100, SE sqrt((20 * 0.9^2 + 10 * 1.1^2 + 70 * 0.1^2) / 99 / 100) = 0.054.
        "each stage over the one before, on the same prompts (change ± paired SE):",
        "  joint SFT -> long-CoT SFT: all +0.100±0.054 (+1.8 SE); "
        "tier (difficulty 2; n=50) +0.400±0.070 (+5.7 SE)",
        "  long-CoT SFT -> RL: all +0.200±0.040 (+5.0 SE); tier (difficulty 2; n=50) +0.200±0.057 (+3.5 SE)",
        "RL tier: difficulty 2, picked by rule: RL's starting greedy accuracy within 0.20..0.80 "
        "(iteration 0: d1 0.900, d2 0.500)",
        "RL over 2 iterations, held-out greedy accuracy: all 0.700 -> 0.800: +0.100±0.030 (+3.3 SE)",
        "  tier (difficulty 2; n=50): 0.500 -> 0.700: +0.200±0.057 (+3.5 SE)",
        "  length penalty on after iteration 1: response tokens 130.0 -> 70.5 (-46%), "
        "accuracy 0.700 -> 0.800",
        "  informative groups 0.50 on average; iterations without an update: 0"]


def test_a_stage_without_a_level_shows_a_dash_and_unfinished_stages_are_left_out(tmp_path):
    (tmp_path / "sft_joint").mkdir()
    easy = report(part(10, 0.5, 0.158), {1: part(10, 0.5, 0.158)})
    (tmp_path / "sft_joint" / "summary.json").write_text(json.dumps({"eval": easy}))
    (tmp_path / "sft_long_cot").mkdir()
    (tmp_path / "sft_long_cot" / "summary.json").write_text(json.dumps({"eval": JOINT}))
    summary = run_summary(load_config(None, [f"output.dir={tmp_path}"]))
    assert "rl" not in summary
    assert format_summary(summary).splitlines()[2:] == [
        "joint SFT       10 0.500±0.158 0.500±0.158           -    0.0   0.00",
        "long-CoT SFT   100 0.500±0.050 0.900±0.042 0.100±0.042    6.6   0.00",
        "each stage over the one before, on the same prompts (change ± paired SE):",
        "  joint SFT -> long-CoT SFT: not scored on the same prompts"]


def test_an_empty_or_named_tier_says_why(tmp_path):
    empty = {**SETTLED, "difficulties": [], "accuracy_by_difficulty": {"1": 0.95, "2": 0.1}}
    assert tier_reason(empty).endswith("within 0.20..0.80 (iteration 0: d1 0.950, d2 0.100)")
    summary = run_summary(write_run(tmp_path))
    rl = {**summary["rl"], "tier": empty, "eval_end": {**summary["rl"]["eval_end"], "eval_tier_n": 0}}
    text = format_summary({**summary, "rl": rl})
    assert text.splitlines()[8].startswith("RL tier: difficulty none, picked by rule")
    assert "RL over 2 iterations" in text and "  tier (" not in text  # no rows, no tier line
    assert tier_reason({"difficulties": [1], "tasks": []}) == \
        "named in the config (eval.tier_difficulties, eval.tier_tasks)"

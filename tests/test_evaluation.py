"""Held-out evaluation: the final answer decides, the trace format is recognised, and mean@K,
pass@K, standard errors, slices and the tier rule are exact on hand-computed cases."""
from __future__ import annotations

import json
import math

import pytest

from kimivl_rl.config import load_config
from kimivl_rl.data.rows import Example
from kimivl_rl.evaluation import (difficulties_in_band, evaluation_report, format_change,
                                  format_report, paired_change, response_rows, settle_tier,
                                  step_change, tier_name, tier_of)
from kimivl_rl.reward.contract import RewardOutput
from kimivl_rl.types import Sample


def ex(answer: str, difficulty: int, task: str = "arith") -> Example:
    return Example(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                   images=[], answer=answer, difficulty=difficulty, pass_rate=None, source="t:1",
                   extra={"task": task})


def sample(text: str, tokens: int) -> Sample:
    return Sample("r", [1], list(range(tokens)), [0.0] * tokens, "stop", text)


def scored(*scores: float) -> list[RewardOutput]:
    return [RewardOutput(s, "correct" if s else "wrong answer") for s in scores]


TRACE = "<think>First I will add the numbers. sum = 5. Let me check: sum = 5.</think>\\boxed{5}"


@pytest.mark.parametrize("text, expected", [
    (TRACE, True),
    ("<think>How many red squares? red = 2.</think>\\boxed{2}", True),
    ("<think>Let me check: 5. Wait, 5.</think>\\boxed{5}", False),  # restates, works nothing out
    ("<think>sum = 5.</think>", False),                               # no answer after thinking
    ("sum = 5. \\boxed{5}", False),                                  # no thinking section
    ("<think>sum = 5.", False),                                       # never closes
])
def test_the_trace_format_is_a_closed_thinking_section_with_a_worked_step(text, expected):
    from kimivl_rl.evaluation import shows_trace_format

    assert shows_trace_format(text, "<think>", "</think>") is expected


def test_greedy_slices_lengths_traces_and_reasons():
    examples = [ex("5", 1), ex("5", 1, "count"), ex("7", 2), ex("A", 3, "colour")]
    greedy = [sample(TRACE, 10), sample("<think>5</think>\\boxed{4}", 6),
              sample("<think>wrong 6</think>\\boxed{7}", 4), sample("\\boxed{(A)}", 4)]
    report = evaluation_report(examples, greedy, scored(1, 0, 1, 1), think_open="<think>",
                               think_close="</think>", tier={"difficulties": [2, 3], "tasks": []})
    every = report["slices"]["all"]
    assert every["n"] == 4 and every["greedy"] == pytest.approx(0.75)
    assert every["greedy_se"] == pytest.approx(math.sqrt(0.75 * 0.25 / 4))
    assert every["tokens_mean"] == pytest.approx(6.0)
    assert every["tokens_p90"] == pytest.approx(8.8)  # numpy's linear interpolation of [4,4,6,10]
    assert every["trace_format"] == pytest.approx(0.25)
    assert report["slices"]["difficulty 1"]["greedy"] == pytest.approx(0.5)
    assert report["slices"]["task arith"]["n"] == 2
    assert report["slices"]["tier"] == {**report["slices"]["tier"], "n": 2, "greedy": 1.0}
    assert report["greedy_reasons"] == {"correct": 3, "wrong answer": 1}
    assert "mean_at_k" not in every and report["samples_per_prompt"] == 0
    assert list(report["slices"])[0] == "all" and list(report["slices"])[-1] == "tier"
    colour = evaluation_report(examples, greedy, scored(1, 0, 1, 1), think_open="<think>",
                               think_close="</think>",
                               tier={"difficulties": None, "tasks": ["colour", "count"]})
    assert colour["slices"]["tier"]["n"] == 2 and colour["slices"]["tier"]["greedy"] == 0.5
    assert "tier: tasks colour, count" in format_report(colour)


@pytest.mark.parametrize("accuracy, picked", [
    ({1: 0.9, 2: 0.8, 3: 0.5, 4: 0.2, 5: 0.1}, [2, 3, 4]),   # the band's edges are in it
    ({1: 0.95, 2: 0.81, 3: 0.19, 4: 0.0}, []),               # none in the band
    ({3: 0.4, 1: 0.6, 2: 0.2, 5: 0.8, 4: 0.3}, [1, 2, 3, 4, 5]),  # all in it, in level order
    ({}, []),                                                # no labelled levels
])
def test_the_tier_rule_takes_the_levels_within_the_band(accuracy, picked):
    assert difficulties_in_band(accuracy, 0.2, 0.8) == picked


def test_a_band_is_settled_once_and_a_named_tier_never():
    rule = {"band": [0.2, 0.8], "tasks": []}
    settled = settle_tier(rule, {1: 0.9, 2: 0.5})
    assert settled == {"band": [0.2, 0.8], "tasks": [], "difficulties": [2],
                       "accuracy_by_difficulty": {"1": 0.9, "2": 0.5}}
    assert settle_tier(settled, {1: 0.5, 2: 0.9}) == settled  # later accuracies change nothing
    named = {"difficulties": [1], "tasks": []}
    assert settle_tier(named, {1: 0.0}) is named and settle_tier(None, {1: 0.5}) is None


def test_a_report_settles_a_band_on_its_own_per_difficulty_accuracy():
    examples = [ex("1", 1), ex("1", 1), ex("2", 2), ex("2", 2), ex("3", 3)]
    greedy = [sample("\\boxed{1}", 2)] * 5
    report = evaluation_report(examples, greedy, scored(1, 1, 1, 0, 0), think_open="<think>",
                               think_close="</think>", tier={"band": [0.2, 0.8], "tasks": []})
    assert report["tier"]["difficulties"] == [2]
    assert report["tier"]["accuracy_by_difficulty"] == {"1": 1.0, "2": 0.5, "3": 0.0}
    assert report["slices"]["tier"]["n"] == 2 and report["slices"]["tier"]["greedy"] == 0.5
    assert json.loads(json.dumps(report)) == report  # RL's metrics.jsonl carries it whole
    hopeless = evaluation_report(examples, greedy, scored(0, 0, 0, 0, 0), think_open="<think>",
                                 think_close="</think>", tier={"band": [0.2, 0.8], "tasks": []})
    assert hopeless["tier"]["difficulties"] == [] and hopeless["slices"]["tier"]["n"] == 0
    assert tier_name(hopeless["tier"]) == "difficulty none"
    assert "tier: difficulty none" in format_report(hopeless)


def test_the_configured_tier_is_a_band_a_list_or_any():
    assert tier_of(load_config(None)) == {"band": [0.2, 0.8], "tasks": []}
    assert tier_of(load_config("configs/tiny.yaml")) == {"band": [0.2, 0.8], "tasks": []}
    assert tier_of(load_config(None, ["eval.tier_difficulties=[1, 2]", "eval.tier_min_accuracy=0.3"])) \
        == {"difficulties": [1, 2], "tasks": []}
    assert tier_of(load_config(None, ["eval.tier_difficulties=[]", "eval.tier_tasks=[count]"])) \
        == {"difficulties": None, "tasks": ["count"]}
    assert tier_name(tier_of(load_config(None, ["eval.tier_difficulties=[]"]))) == "all"


def test_mean_and_pass_at_k_with_standard_errors():
    examples = [ex("1", 1), ex("2", 1), ex("3", 2)]
    greedy = [sample("\\boxed{1}", 3)] * 3
    sampled = [[sample("x", 10), sample("x", 20), sample("x", 30), sample("x", 40)],
               [sample("x", 5)] * 4, [sample("x", 8), sample("x", 12), sample("x", 8), sample("x", 12)]]
    flat = scored(1, 0, 0, 0,  0, 0, 0, 0,  1, 1, 1, 0)
    report = evaluation_report(examples, greedy, scored(1, 0, 0), think_open="<think>",
                               think_close="</think>", sampled=sampled, sampled_scores=flat)
    every = report["slices"]["all"]
    assert report["samples_per_prompt"] == 4
    # per prompt mean@4: [0.25, 0, 0.75] -> mean 1/3, sample std 0.381881 -> se / sqrt(3)
    assert every["mean_at_k"] == pytest.approx(1 / 3)
    assert every["mean_at_k_se"] == pytest.approx(math.sqrt(((1 / 12) ** 2 + (1 / 3) ** 2
                                                             + (5 / 12) ** 2) / 2) / math.sqrt(3))
    # pass@4: [1, 0, 1] -> 2/3, binomial se
    assert every["pass_at_k"] == pytest.approx(2 / 3)
    assert every["pass_at_k_se"] == pytest.approx(math.sqrt(2 / 9 / 3))
    # (max - min) / mean per prompt: 30/25, 0, 4/10
    assert every["length_spread"] == pytest.approx((1.2 + 0 + 0.4) / 3)
    assert every["sampled_tokens_mean"] == pytest.approx((25 + 5 + 10) / 3)
    table = format_report(report)
    assert "mean@4" in table and "pass@4" in table and "0.333±" in table


def test_prompt_drops_the_final_answer_only():
    chat = ex("1", 1).messages + [{"role": "user", "content": "again"}, {"role": "assistant", "content": "b"}]
    example = Example(chat, [], "1", 1, None, "t:1")
    assert [m["role"] for m in example.prompt_messages()] == ["user", "assistant", "user"]


def test_response_rows_name_each_prompts_row_answer_and_scores():
    examples = [ex("5", 1), ex("A", 3, "colour")]
    greedy = [sample(TRACE, 10), sample("\\boxed{(B)}", 4)]
    greedy_scores = [RewardOutput(1.0, "correct", "5"), RewardOutput(0.0, "wrong answer", "B")]
    rows = response_rows(examples, greedy, greedy_scores, scored(1, 0, 1, 0, 0, 0))
    assert rows == [
        {"source": "t:1", "reference": "5", "difficulty": 1, "task": "arith", "response": TRACE,
         "extracted": "5", "score": 1.0, "reason": "correct", "tokens": 10,
         "sample_scores": [1, 0, 1]},
        {"source": "t:1", "reference": "A", "difficulty": 3, "task": "colour",
         "response": "\\boxed{(B)}", "extracted": "B", "score": 0.0, "reason": "wrong answer",
         "tokens": 4, "sample_scores": [0, 0, 0]}]
    assert "sample_scores" not in response_rows(examples, greedy, greedy_scores)[0]


def test_a_paired_change_is_the_mean_of_the_per_prompt_differences_with_their_standard_error():
    # differences 0, -1, 1, 1, 0: mean 0.2, sample variance 2.8 / 4, SE sqrt(0.7 / 5)
    assert paired_change([1, 1, 0, 0, 1], [1, 0, 1, 1, 1]) == pytest.approx((0.2, math.sqrt(0.14)))
    assert paired_change([1, 0], [1, 0]) == (0.0, 0.0)  # the same answers: no change, no error
    with pytest.raises(ValueError, match="not the same prompts"):
        paired_change([1], [1, 0])
    assert format_change({"change": 0.2, "se": math.sqrt(0.14)}) == "+0.200±0.374 (+0.5 SE)"
    assert format_change({"change": 0.0, "se": 0.0}) == "+0.000±0.000"


def test_a_step_compares_two_reports_prompt_by_prompt_on_all_prompts_and_the_tier():
    examples = [ex("5", 1), ex("6", 2), ex("7", 2), ex("8", 2, "count")]
    greedy = [sample(TRACE, 10)] * 4
    kwargs = dict(think_open="<think>", think_close="</think>")
    before = evaluation_report(examples, greedy, scored(1, 0, 1, 0), **kwargs)
    after = evaluation_report(examples, greedy, scored(0, 1, 1, 1), **kwargs)
    assert before["prompts"] == {"score": [1.0, 0.0, 1.0, 0.0], "difficulty": [1, 2, 2, 2],
                                 "task": ["arith", "arith", "arith", "count"]}
    change = step_change(before, after, {"difficulties": [2], "tasks": ["arith"]})
    # all: differences -1, 1, 0, 1 (mean 0.25, sample variance 2.75 / 3); tier: 1, 0
    assert change["all"] == pytest.approx({"n": 4, "change": 0.25, "se": math.sqrt(2.75 / 3 / 4)})
    assert change["tier"] == pytest.approx({"n": 2, "change": 0.5, "se": 0.5})
    assert set(step_change(before, after, None)) == {"all"}
    other = evaluation_report(examples[:3], greedy[:3], scored(1, 1, 1), **kwargs)
    assert step_change(before, other, None) is None  # other prompts: no paired change
    assert step_change({k: v for k, v in before.items() if k != "prompts"}, after, None) is None

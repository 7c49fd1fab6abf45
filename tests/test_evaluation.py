"""Held-out evaluation: the final answer decides, the trace format is recognised, and mean@K,
pass@K, standard errors and slices are exact on hand-computed cases."""
from __future__ import annotations

import math

import pytest

from kimivl_rl.data.rows import Example
from kimivl_rl.evaluation import evaluation_report, format_report
from kimivl_rl.reward.contract import RewardOutput
from kimivl_rl.rollout.vllm_engine import Sample


def ex(answer: str, difficulty: int, task: str = "arith") -> Example:
    return Example(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                   images=[], answer=answer, difficulty=difficulty, pass_rate=None, source="t:1",
                   extra={"task": task})


def sample(text: str, tokens: int) -> Sample:
    return Sample("r", [1], list(range(tokens)), [0.0] * tokens, "stop", text)


def scored(*scores: float) -> list[RewardOutput]:
    return [RewardOutput(s, "correct" if s else "wrong answer") for s in scores]


TRACE = ("<think>First I will add. Let me check: yes. Wait, sure. Let me try another way: same."
         "</think>\\boxed{5}")


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
                               tier={"difficulties": [], "tasks": ["colour", "count"]})
    assert colour["slices"]["tier"]["n"] == 2 and colour["slices"]["tier"]["greedy"] == 0.5
    assert "tier: tasks colour, count" in format_report(colour)


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

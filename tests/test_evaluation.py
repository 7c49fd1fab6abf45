"""Held-out scoring: the final answer decides, the trace format is recognised."""
from __future__ import annotations

import pytest

from kimivl_rl.data.rows import Example
from kimivl_rl.evaluation import prompt_messages, score_samples
from kimivl_rl.rollout.vllm_engine import Sample


def ex(answer: str, difficulty: int) -> Example:
    return Example(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                   images=[], answer=answer, difficulty=difficulty, pass_rate=None, source="t:1")


def sample(text: str, tokens: int) -> Sample:
    return Sample("r", [1], list(range(tokens)), [0.0] * tokens, "stop", text)


TRACE = ("<think>First I will add. Let me check: yes. Wait, sure. Let me try another way: same."
         "</think>\\boxed{5}")


def test_scores_final_answers_lengths_traces_and_levels():
    examples = [ex("5", 1), ex("5", 1), ex("7", 2), ex("A", 2)]
    samples = [sample(TRACE, 10), sample("<think>5</think>\\boxed{4}", 6),
               sample("<think>wrong 6</think>\\boxed{7}", 4), sample("\\boxed{(A)}", 4)]
    result = score_samples(examples, samples, "<think>", "</think>")
    assert result.examples == 4
    assert result.accuracy == pytest.approx(3 / 4)
    assert result.mean_response_tokens == pytest.approx(6.0)
    assert result.trace_format_rate == pytest.approx(1 / 4)
    assert result.accuracy_by_difficulty == {"1": 0.5, "2": 1.0}


def test_prompt_drops_the_final_answer_only():
    chat = ex("1", 1).messages + [{"role": "user", "content": "again"}, {"role": "assistant", "content": "b"}]
    example = Example(chat, [], "1", 1, None, "t:1")
    assert [m["role"] for m in prompt_messages(example)] == ["user", "assistant", "user"]

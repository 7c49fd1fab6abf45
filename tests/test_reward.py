"""Answer-only reward: extraction, verification, the reward contract and the timed scorer."""
from __future__ import annotations

import time

import pytest

from kimivl_rl.reward import (Extraction, RewardInput, RewardOutput, TimedScorer,
                              answer_only_reward, extract_answer, load_reward_fn, normalize_text,
                              split_thinking, verify)

KIMI = {"think_open": "◁think▷", "think_close": "◁/think▷"}


# ----------------------------------------------------------------------------- extraction

@pytest.mark.parametrize("section, expected", [
    ("so \\boxed{3} then \\boxed{4}", Extraction("4", "boxed")),
    ("\\boxed{\\frac{1}{2}}", Extraction("\\frac{1}{2}", "boxed")),
    ("\\boxed{\\{1, 2\\}}", Extraction("\\{1, 2\\}", "boxed")),
    ("\\boxed{7} and then \\boxed{8", Extraction("7", "boxed")),
    ("\\boxed{oops \\boxed{5}", Extraction("5", "boxed")),
    ("\\fbox{red}", Extraction("red", "boxed")),
    ("\\boxed{} \\boxed{  } \\boxed{2}", Extraction("2", "boxed")),
    ("Answer: 12.", Extraction("12", "answer_line")),
    ("Answer: 1\nFinal answer: $68$", Extraction("68", "answer_line")),
    ("**Final answer:** **green**", Extraction("green", "answer_line")),
    ("So the answer is $\\frac{3}{4}$.", Extraction("\\frac{3}{4}", "answer_line")),
    ("I pick (B) because it is largest.", Extraction("B", "choice")),
    ("C)", Extraction("C", "choice")),
    ("D.", Extraction("D", "choice")),
    ("Go with option A", Extraction("A", "choice")),
    ("P(A) = 0.5", Extraction("P(A) = 0.5", "bare")),
    ("  red  ", Extraction("red", "bare")),
    ("3.", Extraction("3", "bare")),
    ("word " * 20, Extraction(None, reason="no answer found")),
    ("   ", Extraction(None, reason="empty answer section")),
    ("\\boxed{" * 10_000, Extraction(None, reason="no answer found")),
])
def test_extract_answer(section, expected):
    assert extract_answer(section) == expected


def test_extract_answer_is_linear_on_hostile_input():
    start = time.perf_counter()
    for section in ["\\boxed{" * 100_000, "{" * 500_000, "answer is " * 100_000, "(A)" * 200_000,
                    "\\boxed{" * 50_000 + "x" + "}" * 50_000]:
        extract_answer(section)
    assert time.perf_counter() - start < 5.0


@pytest.mark.parametrize("text, markers, expected", [
    ("<think>plan</think>\\boxed{3}", {}, ("plan", "\\boxed{3}")),
    ("<think>a</think>b</think> 5", {}, ("a</think>b", " 5")),
    ("plan</think>5", {}, ("plan", "5")),
    ("just 5", {}, (None, "just 5")),
    ("<think>never finished \\boxed{3}", {}, ("never finished \\boxed{3}", "")),
    ("◁think▷plan◁/think▷\\boxed{3}", KIMI, ("plan", "\\boxed{3}")),
    ("◁think▷unfinished", KIMI, ("unfinished", "")),
])
def test_split_thinking(text, markers, expected):
    assert split_thinking(text, **markers) == expected


@pytest.mark.parametrize("text, markers, expected", [
    ("<think>plan</think>\\boxed{3}", {}, True),
    ("plan</think>5", {}, True),             # the generation header opened the section
    ("just 5", {}, False),                    # no thinking section
    ("<think>never finished 3", {}, False),   # never closed
    ("<think> \n</think>5", {}, False),       # nothing thought
    ("<think>plan</think>  ", {}, False),     # no answer after it
    ("◁think▷plan◁/think▷\\boxed{3}", KIMI, True),
    ("<think>plan</think>3", KIMI, False),    # the other family's markers
])
def test_thinks_then_answers(text, markers, expected):
    from kimivl_rl.reward.extract import thinks_then_answers

    assert thinks_then_answers(text, **markers) is expected


# ----------------------------------------------------------------------------- verification

def test_normalize_text():
    assert normalize_text("  The $\\text{Red}$. ") == "the red"
    assert normalize_text("a\n\t b\x00c\u200bd") == "a bcd"
    assert normalize_text("٣٤ ３") == "34 3"
    assert normalize_text("\u22123") == "-3"


@pytest.mark.parametrize("predicted, reference, correct, method", [
    ("red", "red", True, "exact"),
    (" Red. ", "red", True, "exact"),
    ("The  Answer", "the answer", True, "exact"),
    ("\\text{blue}", "blue", True, "exact"),
    ("٣", "3", True, "exact"),
    ("３", "3", True, "exact"),
    ("(B)", "B", True, "choice"),
    ("b)", "B", True, "choice"),
    ("option B", "B", True, "choice"),
    ("C", "B", False, "choice"),
    ("3.0", "3", True, "numeric"),
    ("1,000", "1000", True, "numeric"),
    ("0.3333333", "1/3", True, "numeric"),
    ("0.333", "1/3", False, "numeric"),
    ("-3", "3", False, "numeric"),
    ("50%", "50", True, "numeric"),
    ("\\frac{1}{2}", "0.5", True, "math"),
    ("2\\sqrt{2}", "\\sqrt{8}", True, "math"),
    ("x + 1", "1+x", True, "math"),
    ("\\pi", "3.14", False, "math"),
    ("der", "red", False, "none"),
    ("", "3", False, "none"),
])
def test_verify(predicted, reference, correct, method):
    verdict = verify(predicted, reference)
    assert (verdict.correct, verdict.method) == (correct, method)


def test_verify_numeric_tolerance():
    assert verify("3.001", "3", numeric_tolerance=1e-2).correct
    assert not verify("3.001", "3").correct
    assert not verify("3.0000001", "3", numeric_tolerance=0.0).correct


def test_verify_skips_symbolic_check_for_long_input():
    verdict = verify("1+" * 600 + "1", "1201")
    assert (verdict.correct, verdict.reason) == (False, "too long for symbolic check")


# ----------------------------------------------------------------------------- contract

def _reward(response: str, reference: str = "3", **markers) -> RewardOutput:
    return answer_only_reward(RewardInput(response, reference, **markers))


def test_reward_reads_only_the_final_answer():
    right_reasoning = _reward("<think>The answer is 3, \\boxed{3}.</think>\\boxed{4}")
    assert right_reasoning == RewardOutput(0.0, "wrong answer", "4")
    nonsense_reasoning = _reward("<think>bananas, 2+2=17, \\boxed{12}</think>\\boxed{3}")
    assert nonsense_reasoning == RewardOutput(1.0, "correct", "3")


def test_reward_reasons():
    assert _reward("<think>the answer is 3") == RewardOutput(0.0, "unclosed thinking section")
    assert _reward("<think>ok</think>" + "no idea " * 10) == RewardOutput(0.0, "no answer found")
    kimi = _reward("◁think▷hmm◁/think▷ Answer: (A)", "A", **KIMI)
    assert kimi == RewardOutput(1.0, "correct", "(A)")
    assert _reward("<think>x</think>\\boxed{3.001}") == RewardOutput(0.0, "wrong answer", "3.001")
    lenient = answer_only_reward(RewardInput("\\boxed{3.001}", "3"), numeric_tolerance=1e-2)
    assert lenient.score == 1.0


def test_load_reward_fn():
    assert load_reward_fn(None) is answer_only_reward
    fn = load_reward_fn("reward_plugins:half")
    assert fn(RewardInput("x", "y")) == RewardOutput(0.5, "half credit", "x")


@pytest.mark.parametrize("path, message", [
    ("reward_plugins.half", "'reward_plugins.half': expected 'package.module:function'"),
    (":half", "expected 'package.module:function'"),
    ("reward_plugins:", "expected 'package.module:function'"),
    ("no_such_module_xyz:fn", "'no_such_module_xyz:fn': module 'no_such_module_xyz' not found"),
    ("reward_plugins:missing",
     "'reward_plugins:missing': module 'reward_plugins' has no attribute 'missing'"),
    ("reward_plugins:NOT_CALLABLE",
     "'reward_plugins:NOT_CALLABLE': 'NOT_CALLABLE' is not callable"),
])
def test_load_reward_fn_errors(path, message):
    with pytest.raises(ValueError) as info:
        load_reward_fn(path)
    assert message in str(info.value)


# ----------------------------------------------------------------------------- timed scorer

HOSTILE_BATCH = [  # (item, expected score, expected reason, expected extracted)
    (RewardInput("<think>easy</think>\\boxed{3}", "3"), 1.0, "correct", "3"),
    (RewardInput("<think>hmm</think>\\boxed{4}", "3"), 0.0, "wrong answer", "4"),
    (RewardInput("\\boxed{9^{9^{9^{9^{9}}}}}", "3"), 0.0, "timeout after 1.5s", None),
    (RewardInput("<think>after restart</think>\\boxed{3.001}", "3"), 1.0, "correct", "3.001"),
    (RewardInput("\\boxed{10^{10^{10}}}", "3"), 0.0, "timeout after 1.5s", None),
    (RewardInput("a" * 1_000_000 + "\\boxed{3}", "3"), 1.0, "correct", "3"),
    (RewardInput("\\boxed{3}" + "a" * 1_000_000, "3"), 0.0, "no answer found", None),
    (RewardInput("\\boxed{" * 10_000, "3"), 0.0, "no answer found", None),
    (RewardInput("\x00\x07\x1b[31m\\boxed{\x003}\x7f", "3"), 1.0, "correct", "\x003"),
    (RewardInput("", ""), 0.0, "empty answer section", None),
    (RewardInput("<think>🤔 \ud800</think>\\boxed{٣}", "3"), 1.0, "correct", "٣"),
    (RewardInput("◁think▷思考◁/think▷\\boxed{red}", "Red", **KIMI), 1.0, "correct",
     "red"),
]


def test_timed_scorer_survives_hostile_batch():
    with TimedScorer(None, timeout_s=1.5, numeric_tolerance=1e-2) as scorer:
        outputs = scorer.score_batch([item for item, *_ in HOSTILE_BATCH])
    assert [(o.score, o.reason, o.extracted) for o in outputs] == [
        tuple(expected) for _, *expected in HOSTILE_BATCH]
    assert all(type(o.score) is float for o in outputs)


def test_timed_scorer_with_user_function():
    items = [RewardInput(response, "a") for response in
             ["a", "raise", "sleep", "a", "b", "too generous", "not an output", "crash", "a"]]
    with TimedScorer("reward_plugins:by_response", timeout_s=1.0) as scorer:
        start = time.perf_counter()
        outputs = scorer.score_batch(items)
        elapsed = time.perf_counter() - start
    assert [(o.score, o.reason) for o in outputs] == [
        (1.0, "compared"),
        (0.0, "verifier error: ValueError: bad reference"),
        (0.0, "timeout after 1.0s"),
        (1.0, "compared"),
        (0.0, "compared"),
        (0.0, "verifier error: ValueError: reward function returned score 2.0, "
              "expected a value in [0, 1]"),
        (0.0, "verifier error: TypeError: reward function returned float, expected RewardOutput"),
        (0.0, "worker crashed (exit code 3)"),
        (1.0, "compared"),
    ]
    assert elapsed < 8.0  # the 10 s sleep was cut off, not waited for


def test_timed_scorer_rejects_bad_path_and_use_after_close():
    with pytest.raises(ValueError, match="'reward_plugins:missing'"):
        TimedScorer("reward_plugins:missing")
    scorer = TimedScorer("reward_plugins:half")
    assert scorer.score_batch([RewardInput("x", "y")]) == [RewardOutput(0.5, "half credit", "x")]
    scorer.close()
    with pytest.raises(RuntimeError, match="closed"):
        scorer.score_batch([RewardInput("x", "y")])

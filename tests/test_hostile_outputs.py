"""Hostile model outputs: whatever string a policy writes, the reward service answers every item
within its time limit with a score and a reason, keeps running, and keeps its memory bounded.

The fuzz corpus is generated from a fixed seed, so a failure names an item that can be
regenerated. Wall-clock time gates nothing here except the per-item limit that the scorer
itself enforces and reports (``TimedScorer.last_seconds``, "timeout after ...").
"""
from __future__ import annotations

import gc
import random
import unicodedata
from collections import Counter
from typing import Callable, Iterator, Optional

import psutil
import pytest

from kimivl_rl.reward import RewardInput, RewardOutput, normalize_text, verify
from kimivl_rl.reward.scoring import NO_REASON, TimedScorer
from kimivl_rl.reward.service import (MAX_REASON_KINDS, OTHER_REASONS, RewardService,
                                      count_reasons, reason_kind)
from kimivl_rl.reward.verify import MATH_MAX_DEPTH, nesting_depth

SEED = 6_0507
N_ITEMS = 3000
BATCH = 100
TIMEOUT_S = 1.0
# Generous: the parent passes through a few MB strings; what is tested is that nothing piles up.
MAX_RSS_GROWTH = 200 * 2**20
MAX_WORKER_RSS = 1024 * 2**20

# Where each script's decimal digits start (all of category Nd).
DIGIT_ZEROS = {"ascii": 0x30, "arabic-indic": 0x660, "extended arabic-indic": 0x6F0,
               "devanagari": 0x966, "bengali": 0x9E6, "gujarati": 0xAE6, "thai": 0xE50,
               "myanmar": 0x1040, "fullwidth": 0xFF10, "mathematical bold": 0x1D7CE}
BIDI_MARKS = "\u200e\u200f\u061c\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
ZERO_WIDTH = "\u200b\u200c\u200d\u2060\ufeff"
CONTROLS = "".join(map(chr, range(0x20))) + "\x7f\x85\x9f"
LATEX_TOKENS = ["\\boxed{", "\\fbox{", "{", "}", "\\{", "\\}", "\\", "$", "$$", "**", "\\frac{",
                "\\sqrt{", "^{", "_{", "^", "\\text{", "\\left(", "\\right)", "(", ")", "[", "]",
                "+", "-", "*", "/", "=", "!", "%", ".", ",", "e", "x", "\\pi", "\\infty",
                "\\cdot", "\\times", "&", "\\\\", "\\begin{pmatrix}", "\\end{pmatrix}", " ", "\n"]
MARKERS = ["<think>", "</think>", "◁think▷", "◁/think▷", "Answer:", "Final answer:",
           "the answer is", "(A)", "(B)", "option C", "D.", "**Answer:**"]
REFERENCES = ["3", "red", "B", "\\frac{1}{2}", "12", "-7", "0.25", "yes"]
# Values that no machine computes within any time limit, in the forms a policy writes them.
EXPLOSIVE = ["\\boxed{10^{10^{10^{10}}}}", "\\boxed{9^{9^{9^{9^{9}}}}}", "\\boxed{(10^{10})!}",
             "Answer: \\binom{10^{9}}{10^{8}}"]
KNOWN_REASONS = {"correct", "wrong answer", "no answer found", "empty answer section",
                 "unclosed thinking section", f"timeout after {TIMEOUT_S}s"}


def digits_in(script: str, number: int) -> str:
    return "".join(chr(DIGIT_ZEROS[script] + int(d)) for d in str(number))


# ----------------------------------------------------------------------------- generators
# Each returns (response, reference, must_be_correct).

Case = tuple[str, str, bool]


def _char(rng: random.Random) -> str:
    pool = rng.randrange(9)
    if pool == 0:
        return rng.choice(CONTROLS)
    if pool == 1:
        return chr(rng.randrange(0xD800, 0xE000))  # a lone surrogate
    if pool == 2:
        return rng.choice(BIDI_MARKS + ZERO_WIDTH)
    if pool == 3:
        return chr(rng.choice(list(DIGIT_ZEROS.values())) + rng.randrange(10))
    if pool == 4:
        return chr(rng.randrange(0x300, 0x370))  # combining marks
    if pool == 5:
        return chr(rng.choice([rng.randrange(0x4E00, 0x9FFF), rng.randrange(0x1F300, 0x1FAFF),
                               rng.randrange(0x600, 0x6FF), rng.randrange(0x10000, 0x10FFFF)]))
    return chr(rng.randrange(0x20, 0x7F))


def unicode_soup(rng: random.Random) -> Case:
    text = "".join(_char(rng) for _ in range(rng.choice([0, 1, 5, 40, 120, 400])))
    wrap = rng.randrange(4)
    if wrap == 1:
        text = f"<think>{text}</think>\\boxed{{{text[:rng.randrange(8)]}}}"
    elif wrap == 2:
        text = f"Answer: {text[:30]}"
    return text, rng.choice(REFERENCES), False


def token_soup(rng: random.Random) -> Case:
    tokens = LATEX_TOKENS + MARKERS + [str(rng.randrange(100)), _char(rng)]
    return "".join(rng.choice(tokens) for _ in range(rng.randrange(120))), rng.choice(REFERENCES), False


def nested(rng: random.Random) -> Case:
    opener, closer = rng.choice([("\\frac{1}{", "}"), ("\\sqrt{", "}"), ("2^{", "}"), ("(", ")"),
                                 ("{", "}"), ("\\left(", "\\right)"), ("\\boxed{", "}"),
                                 ("\\text{", "}"), ("[", "]")])
    depth = rng.choice([3, 9, 15, 40, 120, 500])
    closers = depth if rng.random() < 0.5 else rng.randrange(depth + 1)  # often unclosed
    body = opener * depth + str(rng.randrange(10)) + closer * closers
    return rng.choice(["\\boxed{%s}", "Answer: %s", "%s", "<think>x</think>%s"]) % body, \
        rng.choice(REFERENCES), False


def short_math(rng: random.Random) -> Case:
    """Short, math-looking answers: these reach the symbolic check."""
    tokens = ["1", "2", "3", "9", "10", "x", "+", "-", "*", "/", "^", "^{", "}", "(", ")",
              "\\frac{", "}{", "\\sqrt{", "!", "**", ".", "e", "\\pi", "="]
    body = "".join(rng.choice(tokens) for _ in range(rng.randrange(1, 10)))
    return f"<think>t</think>\\boxed{{{body}}}", rng.choice(["3", "\\frac{1}{2}", "x+1"]), False


def huge(rng: random.Random) -> Case:
    n = rng.choice([100_000, 300_000, 1_000_000, 2_000_000])
    unit = rng.choice(["\\boxed{", "{", "}", "answer is ", "(A)", "<think>", "</think>", "$", "**",
                       "٣", "\u202e", "\x00", "a", "\\frac{1}{"])
    text = unit * (n // len(unit))
    tail = rng.choice(["", "\\boxed{3}", "</think>\\boxed{3}", "Answer: 3"])
    return text + tail, "3", False


def think_games(rng: random.Random) -> Case:
    parts = [rng.choice(MARKERS + ["\\boxed{3}", "\\boxed{4}", "3", "}", "{", " "]) for _ in range(12)]
    return "".join(parts), "3", False


def other_scripts_correct(rng: random.Random) -> Case:
    """A correct answer in another script's digits, decorated with invisible characters:
    must score 1 (the policy decided in Unicode decimal digits normalise to ASCII)."""
    number = rng.randrange(1000)
    digits = digits_in(rng.choice(list(DIGIT_ZEROS)), number)
    noise = "".join(rng.choice(BIDI_MARKS + ZERO_WIDTH + "\x00\x07") for _ in range(rng.randrange(4)))
    cut = rng.randrange(len(digits) + 1)
    answer = digits[:cut] + noise + digits[cut:]
    form = rng.choice(["<think>{t}</think>\\boxed{{{a}}}", "<think>{t}</think>Answer: {a}",
                       "{t}</think> ${a}$", "◁think▷{t}◁/think▷\\boxed{{{a}}}"])
    thinking = "".join(_char(rng) for _ in range(20)).replace("<", "").replace("◁", "")
    return form.format(t=thinking, a=answer), str(number), True


def empty(rng: random.Random) -> Case:
    return rng.choice(["", " ", "\n\t", "\x00", "\u200b", "<think></think>", "\\boxed{}"]), "3", False


GENERATORS: list[tuple[Callable[[random.Random], Case], int]] = [
    (unicode_soup, 27), (token_soup, 22), (short_math, 8), (nested, 12), (huge, 1),
    (think_games, 10), (other_scripts_correct, 15), (empty, 3)]


def hostile_corpus(seed: int = SEED, n: int = N_ITEMS) -> Iterator[Case]:
    """n cases from the generators; the explosive ones sit at fixed, spread-out positions."""
    rng = random.Random(seed)
    funcs, weights = zip(*GENERATORS)
    explosive_at = {round(n * (i + 1) / (len(EXPLOSIVE) + 1)): e for i, e in enumerate(EXPLOSIVE)}
    for i in range(n):
        if i in explosive_at:
            yield explosive_at[i], "3", False
        else:
            yield rng.choices(funcs, weights)[0](rng)


def test_corpus_is_deterministic_and_hostile():
    first = list(hostile_corpus(n=300))
    assert first == list(hostile_corpus(n=300))
    text = "".join(response for response, _, _ in first)
    for needle in ("\x00", "\u202e", "\u200b", "\\boxed{", "٣", "३", "３", "\\frac{", "</think>"):
        assert needle in text
    assert any(0xD800 <= ord(ch) < 0xE000 for ch in text)  # lone surrogates
    assert max(len(r) for r, _, _ in hostile_corpus()) >= 1_000_000


# ----------------------------------------------------------------------------- the fuzz run

def _rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def _check(output: RewardOutput, seconds: float, case: Case, index: int) -> Optional[str]:
    """What is wrong with one item's result, or None."""
    response, reference, must_be_correct = case
    where = f"item {index} (seed {SEED}): response[:80]={response[:80]!r}, reference={reference!r}"
    if type(output.score) is not float or output.score not in (0.0, 1.0):
        return f"{where}: score {output.score!r}"
    if not isinstance(output.reason, str) or not output.reason:
        return f"{where}: no reason"
    if output.reason not in KNOWN_REASONS:
        return f"{where}: unexpected reason {output.reason!r}"
    if (output.score == 1.0) != (output.reason == "correct"):
        return f"{where}: score {output.score} with reason {output.reason!r}"
    timed_out = output.reason.startswith("timeout after")
    # Poll returns at the limit; the slack covers a descheduled parent on a loaded machine.
    if seconds > TIMEOUT_S + 2.0 or (not timed_out and seconds > TIMEOUT_S + 0.5):
        return f"{where}: took {seconds:.2f}s with reason {output.reason!r}"
    if must_be_correct and output.score != 1.0:
        return f"{where}: a correct answer scored {output.score} ({output.reason})"
    return None


def test_reward_service_survives_a_hostile_corpus():
    rss_before = _rss()
    service = RewardService(None, timeout_s=TIMEOUT_S, numeric_tolerance=1e-6)
    problems: list[str] = []
    reasons: Counter = Counter()
    corpus = hostile_corpus()
    index = 0
    try:
        while True:
            cases = [case for _, case in zip(range(BATCH), corpus)]
            if not cases:
                break
            outputs = service.score([RewardInput(response, reference)
                                     for response, reference, _ in cases])
            assert len(outputs) == len(cases) == len(service.scorer.last_seconds)
            for output, seconds, case in zip(outputs, service.scorer.last_seconds, cases):
                problem = _check(output, seconds, case, index)
                if problem:
                    problems.append(problem)
                reasons[output.reason] += 1
                index += 1
            del cases, outputs
        assert index == N_ITEMS
        assert problems == []
        # Every explosive value hit the limit and the service went on with the next item.
        assert reasons[f"timeout after {TIMEOUT_S}s"] >= len(EXPLOSIVE)
        # Still a working service, and with a live worker of bounded size.
        after = service.score([RewardInput("<think>fine</think>\\boxed{\\frac{1}{2}}", "0.5"),
                               RewardInput("<think>ok</think>Answer: ３", "3")])
        assert [(o.score, o.reason) for o in after] == [(1.0, "correct"), (1.0, "correct")]
        assert psutil.Process(service.scorer.worker_pid).memory_info().rss < MAX_WORKER_RSS
    finally:
        service.scorer.close()
    assert _rss() - rss_before < MAX_RSS_GROWTH


# ----------------------------------------------------------------------------- other scripts' digits

@pytest.mark.parametrize("script", sorted(DIGIT_ZEROS))
def test_decimal_digits_of_every_script_read_as_ascii(script):
    for number in (0, 7, 42, 305, 1000):
        written = digits_in(script, number)
        assert normalize_text(written) == str(number)
        assert verify(written, str(number)).correct
        assert not verify(written, str(number + 1)).correct
    assert verify(digits_in(script, 3) + "/" + digits_in(script, 4), "0.75").correct


@pytest.mark.parametrize("predicted, reference, correct, method", [
    ("٣٫٥", "3.5", True, "exact"),        # Arabic decimal separator
    ("٣٫٥", "3", False, "numeric"),       # ... not read as "3" followed by junk
    ("١٬٠٠٠", "1000", True, "numeric"),   # Arabic thousands separator
    ("٥٠٪", "50", True, "numeric"),       # Arabic percent sign
    ("\u2212３", "-3", True, "exact"),     # minus sign and a fullwidth digit
    ("３．５", "3.5", True, "exact"),       # fullwidth full stop
    ("（Ｂ）", "B", True, "choice"),        # fullwidth parentheses and letter
    ("ｒｅｄ", "red", True, "exact"),
    ("\u200f٣\u200e", "3", True, "exact"),  # RTL / LTR marks are dropped
    ("३\u200b४", "34", True, "exact"),      # so are zero-width characters
])
def test_number_punctuation_and_fullwidth_forms(predicted, reference, correct, method):
    verdict = verify(predicted, reference)
    assert (verdict.correct, verdict.method) == (correct, method)


@pytest.mark.parametrize("predicted, reference", [("³", "3"), ("½", "0.5"), ("Ⅲ", "3"),
                                                  ("²", "2")])
def test_other_numeric_characters_are_not_digits(predicted, reference):
    # Superscripts, vulgar fractions and Roman numerals are not decimal digits: compared as
    # written, so always wrong against an ASCII number, and the same verdict every time.
    verdicts = {verify(predicted, reference) for _ in range(2)}
    assert len(verdicts) == 1 and not verdicts.pop().correct
    assert unicodedata.decimal(predicted, None) is None


def test_other_scripts_through_the_timed_scorer():
    items = [RewardInput(f"<think>x</think>\\boxed{{{digits_in(script, 12)}}}", "12")
             for script in sorted(DIGIT_ZEROS)]
    items.append(RewardInput("<think>x</think>\\boxed{१३}", "12"))
    with TimedScorer(None, timeout_s=5.0) as scorer:
        outputs = scorer.score_batch(items)
    assert [o.score for o in outputs] == [1.0] * len(DIGIT_ZEROS) + [0.0]
    assert outputs[-1].reason == "wrong answer"


# ----------------------------------------------------------------------------- nesting guard

@pytest.mark.parametrize("text, depth", [("", 0), ("x", 0), ("(x)", 1), ("\\frac{1}{2}", 1),
                                         ("\\frac{\\sqrt{2}}{2}", 2), ("((((", 4), (")))(", 1),
                                         ("{[(x)]}", 3)])
def test_nesting_depth(text, depth):
    assert nesting_depth(text) == depth


def test_deep_nesting_is_judged_without_the_symbolic_parser():
    deep = "\\frac{1}{" * (MATH_MAX_DEPTH + 1) + "2" + "}" * (MATH_MAX_DEPTH + 1)
    verdict = verify(deep, "3")
    assert (verdict.correct, verdict.reason) == (False, "too deeply nested for symbolic check")
    braces = "{" * 40 + "3" + "}" * 40  # would take minutes in the LaTeX parser
    assert verify(braces, "4").reason == "too deeply nested for symbolic check"
    # Within the limit real answers still go through the symbolic check.
    assert verify("\\frac{\\sqrt{4}}{4}", "0.5").method == "math"


# ----------------------------------------------------------------------------- reasons

def test_reason_counts_stay_bounded_and_every_output_has_a_reason():
    kinds = [reason_kind(f"verifier error: ValueError: bad input {i}") for i in range(3)]
    assert kinds == ["verifier error: ValueError"] * 3
    assert reason_kind("timeout after 5.0s") == "timeout after 5.0s"
    assert reason_kind(None) == ""
    service = RewardService("reward_plugins:echo_reason", timeout_s=5.0, numeric_tolerance=0.0)
    try:
        outputs = service.score([RewardInput(f"reason {i}", "x") for i in range(200)] +
                                [RewardInput("", "x"), RewardInput("raise", "x")])
    finally:
        service.scorer.close()
    assert [o.reason for o in outputs[:3]] == ["reason 0", "reason 1", "reason 2"]
    assert outputs[-2] == RewardOutput(0.0, NO_REASON, "")
    counts = count_reasons(o.reason for o in outputs)
    assert len(counts) == MAX_REASON_KINDS + 1
    assert counts[OTHER_REASONS] == 202 - MAX_REASON_KINDS
    assert sum(counts.values()) == 202

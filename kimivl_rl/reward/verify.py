"""Decide whether a predicted final answer matches the reference answer.

Cheap checks run first (normalised text, choice letters, numbers) and the symbolic check with
math_verify runs last, only on short inputs that look like math. math_verify's own timeouts use
``signal.alarm``, which only works in a process's main thread, so they are switched off here
(``parsing_timeout=None`` / ``timeout_seconds=None``): :class:`kimivl_rl.reward.TimedScorer`
bounds the time of the whole reward call instead.

Other scripts' numbers: every Unicode decimal digit (category Nd: Arabic-Indic ٣, Devanagari ३,
fullwidth ３, mathematical bold 𝟑, ...) reads as its ASCII digit, the Arabic decimal and
thousands separators and percent sign (٫ ٬ ٪) and the minus sign (−) as ``. , % -``, and the
other fullwidth ASCII forms (``（Ｂ）``) as ASCII. Other numeric characters (superscripts ³, vulgar
fractions ½, Roman numerals Ⅲ) are not digits and are compared as written.
"""
from __future__ import annotations

import logging
import math
import re
import unicodedata
from dataclasses import dataclass
from typing import Optional

MATH_MAX_CHARS = 1000  # symbolic parsing of longer strings is slow and never a real answer
# The LaTeX parser's time grows exponentially with nesting (12 nested \frac or 10 nested braces
# take seconds); real answers nest a few levels, so deeper ones are judged without it.
MATH_MAX_DEPTH = 8
NUMBER_MAX_CHARS = 100

_TEXT_WRAPPERS = ("\\text{", "\\textbf{", "\\mathrm{", "\\mbox{")
_DROP_CATEGORIES = {"Cc", "Cf", "Cs"}  # control, format (zero-width) and lone surrogates
# Whitespace controls become spaces when whitespace is collapsed; the others are dropped.
_ASCII_CONTROLS = {code: None for code in [*range(0x20), 0x7F] if not chr(code).isspace()}
# Number punctuation of other scripts: the minus sign, Arabic decimal and thousands separators
# and the Arabic percent sign.
_NUMBER_PUNCTUATION = {"\u2212": "-", "\u066b": ".", "\u066c": ",", "\u066a": "%"}
_FULLWIDTH_ASCII = range(0xFF01, 0xFF5F)  # "！" .. "～": ASCII shifted by 0xFEE0
_LEADING_JUNK = " '\"`*:;,"
# "." "?" and "!" are not stripped at the start (".5") and "!" never (factorials).
_TRAILING_JUNK = " '\"`*:;,.?"

_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?")
_GROUPED_NUMBER = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_LETTER_FORM = re.compile(r"(?:(?:option|choice) ?)?[(\[]?([a-z])[)\]]?")
_PLAIN_WORDS = re.compile(r"[a-z' -]+")

# math_verify warns once per process that its timeouts are off; the TimedScorer enforces them.
for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(
        lambda record: not record.getMessage().startswith("Timeout is disabled"))


@dataclass(frozen=True)
class Verdict:
    correct: bool
    method: str  # "exact", "numeric", "choice", "math" or "none"
    reason: Optional[str] = None  # why the answer was judged wrong


def _clean(s: str) -> str:
    """Drop control characters, map other scripts' digits and number punctuation and the
    fullwidth ASCII forms to ASCII, collapse whitespace."""
    if s.isascii():  # fast path for the common case
        return " ".join(s.translate(_ASCII_CONTROLS).split())
    out = []
    for ch in s:
        if ch.isspace():
            out.append(" ")
        elif ch in _NUMBER_PUNCTUATION:
            out.append(_NUMBER_PUNCTUATION[ch])
        elif unicodedata.category(ch) not in _DROP_CATEGORIES:
            digit = unicodedata.decimal(ch, None)
            if digit is not None:
                out.append(str(digit))
            elif ord(ch) in _FULLWIDTH_ASCII:
                out.append(chr(ord(ch) - 0xFEE0))
            else:
                out.append(ch)
    return " ".join("".join(out).split())


def nesting_depth(s: str) -> int:
    """The deepest nesting of (), [] and {} (escaped or not, matched or not) in one pass."""
    depth = deepest = 0
    for ch in s:
        if ch in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in ")]}" and depth:
            depth -= 1
    return deepest


def _wrapper_at(s: str, i: int) -> Optional[str]:
    """The text wrapper (e.g. ``\\text{``) starting at s[i], if any."""
    if s[i] != "\\":
        return None
    return next((p for p in _TEXT_WRAPPERS if s.startswith(p, i)), None)


def _unwrap_text(s: str) -> str:
    """Replace ``\\text{X}`` (and similar wrappers) by X, nested or not, in one pass."""
    if "\\" not in s:
        return s
    out: list[str] = []
    closes_wrapper: list[bool] = []  # one entry per open brace: does its "}" close a wrapper?
    i, n = 0, len(s)
    while i < n:
        prefix = _wrapper_at(s, i)
        if prefix is not None:
            closes_wrapper.append(True)
            i += len(prefix)
            continue
        if s[i] == "{":
            closes_wrapper.append(False)
        elif s[i] == "}" and closes_wrapper and closes_wrapper.pop():
            i += 1
            continue
        out.append(s[i])
        i += 1
    return "".join(out)


def normalize_text(s: str) -> str:
    """Canonical form for exact comparison: "  The $\\text{Red}$. " -> "the red"."""
    s = _unwrap_text(_clean(s)).replace("$", "").lower()
    return " ".join(s.split()).lstrip(_LEADING_JUNK).rstrip(_TRAILING_JUNK)


def parse_number(s: str) -> Optional[float]:
    """A finite number from a normalised string: "3", "-0.5", "1,000", "3/4", "1e-3", "50%"."""
    s = s.removesuffix("%").strip()
    if len(s) > NUMBER_MAX_CHARS or s.count("/") > 1:
        return None
    if "/" in s:
        num, _, den = s.partition("/")
        top, bottom = parse_number(num), parse_number(den)
        return None if top is None or not bottom else top / bottom
    if _GROUPED_NUMBER.fullmatch(s):
        s = s.replace(",", "")
    if not _NUMBER.fullmatch(s):
        return None
    value = float(s)
    return value if math.isfinite(value) else None


def choice_letter(s: str) -> Optional[str]:
    """The letter of a normalised choice answer: "b", "(b)", "b)", "[b]", "option b"."""
    match = _LETTER_FORM.fullmatch(s)
    return match.group(1) if match else None


def _math_verdict(predicted: str, reference: str) -> Verdict:
    """Symbolic equivalence with math_verify, e.g. "\\frac{1}{2}" vs "0.5"."""
    if max(len(predicted), len(reference)) > MATH_MAX_CHARS:
        return Verdict(False, "none", "too long for symbolic check")
    if max(nesting_depth(predicted), nesting_depth(reference)) > MATH_MAX_DEPTH:
        return Verdict(False, "none", "too deeply nested for symbolic check")
    from math_verify import parse, verify as math_equal  # imports sympy: only when needed

    gold = parse(f"${reference}$", parsing_timeout=None)
    pred = parse(f"${predicted}$", parsing_timeout=None)
    if not gold or not pred:
        return Verdict(False, "none", "not parseable as math")
    if math_equal(gold, pred, timeout_seconds=None):
        return Verdict(True, "math")
    return Verdict(False, "math", "not equivalent")


def verify(predicted: str, reference: str, numeric_tolerance: float = 1e-6) -> Verdict:
    """Compare a predicted answer with the reference, from the cheapest check to the costliest."""
    pred, ref = normalize_text(predicted), normalize_text(reference)
    if not pred or not ref:
        return Verdict(False, "none", "empty answer")
    if pred == ref:
        return Verdict(True, "exact")
    ref_letter, pred_letter = choice_letter(ref), choice_letter(pred)
    if ref_letter is not None and pred_letter is not None:
        correct = pred_letter == ref_letter
        return Verdict(correct, "choice", None if correct else "different choice")
    pred_num, ref_num = parse_number(pred), parse_number(ref)
    if pred_num is not None and ref_num is not None:
        correct = math.isclose(pred_num, ref_num, rel_tol=numeric_tolerance,
                               abs_tol=numeric_tolerance)
        return Verdict(correct, "numeric", None if correct else "numbers differ")
    if _PLAIN_WORDS.fullmatch(pred) or _PLAIN_WORDS.fullmatch(ref):
        # Sympy reads words as products of symbols, so "red" would equal "der".
        return Verdict(False, "none", "mismatch")
    return _math_verdict(_clean(predicted).replace("$", ""), _clean(reference).replace("$", ""))

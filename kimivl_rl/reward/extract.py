"""Find the final answer in a model response, ignoring the thinking section.

Everything here runs in time linear in the input: responses come from a policy under training
and can be arbitrarily long or adversarial, so braces are scanned by hand and the few regular
expressions used have no nested quantifiers.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

BOX_PREFIXES = ("\\boxed{", "\\fbox{")
BARE_MAX_CHARS = 50  # longer text without a marker is prose, not an answer

# "Answer: X", "Final answer: X", "the answer is X", also with markdown bold around the marker.
_ANSWER_LINE = re.compile(r"\banswer\b[ \t*]*(?:is\b|:)[ \t*:]*(?P<value>[^\n]*)", re.IGNORECASE)
# "(B)" not preceded by a word character, so "P(A)" or "f(X)" is not read as a choice.
_PAREN_CHOICE = re.compile(r"(?<![A-Za-z0-9_])\(([A-Z])\)")
_OPTION_CHOICE = re.compile(r"\b(?i:option|choice)[ \t]+\(?([A-Z])\b")
# "B)" or "B." as the whole answer section.
_ALONE_CHOICE = re.compile(r"([A-Z])[).]")


@dataclass(frozen=True)
class Extraction:
    answer: Optional[str]
    method: Optional[str] = None  # "boxed", "answer_line", "choice" or "bare" when found
    reason: Optional[str] = None  # why nothing was found, when answer is None


def thinking_unclosed(text: str, think_open: str = "<think>",
                      think_close: str = "</think>") -> bool:
    """True when the response opened a thinking section and never closed it (ran out of tokens)."""
    return bool(think_open) and think_open in text and not (think_close and think_close in text)


def thinks_then_answers(text: str, think_open: str = "<think>", think_close: str = "</think>") -> bool:
    """A well-formed thinking section: some reasoning, closed, then a non-empty answer section."""
    reasoning, answer = split_thinking(text, think_open, think_close)
    return bool(think_close in text and reasoning and reasoning.strip() and answer.strip())


def split_thinking(text: str, think_open: str = "<think>",
                   think_close: str = "</think>") -> tuple[Optional[str], str]:
    """Split a response into (reasoning, answer section).

    The answer section follows the LAST closing marker, so a model that mentions the marker
    inside its reasoning cannot smuggle text into the answer. An unclosed thinking section
    yields an empty answer section: the model never committed to an answer.
    """
    if think_close and think_close in text:
        end = text.rindex(think_close)
        reasoning = text[:end]
        if think_open and think_open in reasoning:
            reasoning = reasoning[reasoning.index(think_open) + len(think_open):]
        return reasoning, text[end + len(think_close):]
    if thinking_unclosed(text, think_open, think_close):
        return text[text.index(think_open) + len(think_open):], ""
    return None, text


def last_boxed(text: str) -> Optional[str]:
    """Content of the last-opened balanced non-empty ``\\boxed{...}`` / ``\\fbox{...}``, or None.

    One pass with a stack of open braces: an unclosed box simply stays on the stack, so
    ``"\\boxed{" * n`` costs O(n) rather than a rescan per occurrence. ``\\{`` and ``\\}`` are
    escaped braces and do not count.
    """
    stack: list[Optional[int]] = []  # content start for a box's brace, None for a plain brace
    found: Optional[tuple[int, int]] = None
    last_solid = -1  # index of the last non-whitespace character seen, to skip empty boxes
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            prefix = next((p for p in BOX_PREFIXES if text.startswith(p, i)), None)
            step = 2 if prefix is None else len(prefix)
            if prefix is not None:
                stack.append(i + step)
            last_solid = min(i + step, n) - 1
            i += step
            continue
        if ch == "{":
            stack.append(None)
        elif ch == "}" and stack:
            start = stack.pop()
            # The box opened last wins (the innermost of nested ones); slicing happens once at
            # the end because slicing every nested box would copy O(n^2) characters.
            if start is not None and last_solid >= start and (found is None or start > found[0]):
                found = (start, i)
        if not ch.isspace():
            last_solid = i
        i += 1
    return None if found is None else text[found[0]:found[1]].strip()


def strip_decorations(value: str) -> str:
    """Remove whitespace, a trailing period and surrounding ``$`` / ``**`` around an answer.

    Works on indices and slices once, so a long run of ``$`` stays linear.
    """
    lo, hi = 0, len(value)
    while lo < hi:
        if value[lo].isspace() or value[lo] in "$*":
            lo += 1
        elif value[hi - 1].isspace() or value[hi - 1] in "$*.":
            hi -= 1
        else:
            break
    return value[lo:hi]


def _answer_line(section: str) -> Optional[str]:
    """Value of the last non-empty "answer: X" / "answer is X" marker."""
    found = None
    for match in _ANSWER_LINE.finditer(section):
        value = strip_decorations(match.group("value"))
        if value:
            found = value
    return found


def _choice(section: str) -> Optional[str]:
    """The last multiple-choice letter written as "(B)", "option B", or "B)" / "B." alone."""
    alone = _ALONE_CHOICE.fullmatch(section.strip())
    if alone:
        return alone.group(1)
    last: Optional[re.Match[str]] = None
    for pattern in (_PAREN_CHOICE, _OPTION_CHOICE):
        for match in pattern.finditer(section):
            if last is None or match.start() > last.start():
                last = match
    return None if last is None else last.group(1)


def extract_answer(answer_section: str) -> Extraction:
    """The final answer of an answer section, trying the most explicit formats first."""
    boxed = last_boxed(answer_section)
    if boxed is not None:
        return Extraction(boxed, "boxed")
    line = _answer_line(answer_section)
    if line is not None:
        return Extraction(line, "answer_line")
    letter = _choice(answer_section)
    if letter is not None:
        return Extraction(letter, "choice")
    bare = strip_decorations(answer_section)
    if not bare:
        return Extraction(None, reason="empty answer section")
    if len(bare) <= BARE_MAX_CHARS:
        return Extraction(bare, "bare")
    return Extraction(None, reason="no answer found")

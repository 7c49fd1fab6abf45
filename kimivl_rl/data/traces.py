"""Long chain-of-thought traces for built-in tasks.

A trace first does the work: it plans ("First I will ...") and writes each intermediate result
as ``X = Y``, then concludes from what it wrote. On a question about several colours it counts
every colour in turn, always in the same order, and then adds up or compares the counts it has
written: a tiny model that cannot count four colours and compare them in one pass can read one
colour at a time and compare numbers it has just written (docs/experiments.md, design 15).
Every step is right and the trace ends at the task's answer.

Then come the recipe's other behaviours, all redundant: evaluation ("Let me check ..."),
reflection ("Wait, ...") and exploration ("Let me try another way: ..."), each restating the
result, with 0 to ``MAX_EXTRA_CHECKS`` more restatements after the check, their number drawn per
task from a hash the model cannot predict: one prompt's samples then differ in length by up to
thirty tokens at the same answer. That redundancy is what the k1.5 length penalty can remove
without losing accuracy; the worked steps are what a response keeps to show the trace format
(``shows_work``).
"""
from __future__ import annotations

import hashlib
import re
from collections import Counter

from kimivl_rl.data.tasks import COLOURS, Task

BEHAVIOUR_MARKERS = {
    "planning": "First I will",
    "evaluation": "Let me check",
    "reflection": "Wait,",
    "exploration": "Let me try another way",
}
MAX_EXTRA_CHECKS = 4
# A worked step: an intermediate result written as "X = Y" ("sum = 8", "red = 3", "in all = 6").
WORKED_STEP = re.compile(r"\S *= *\w")


def trace_behaviours(text: str) -> set[str]:
    """Which of the four behaviours a piece of reasoning shows."""
    return {name for name, marker in BEHAVIOUR_MARKERS.items() if marker in text}


def shows_work(reasoning: str) -> bool:
    """Whether reasoning writes down at least one worked step (``WORKED_STEP``): a restated
    answer alone is no reasoning."""
    return WORKED_STEP.search(reasoning) is not None


def extra_checks(task: Task) -> int:
    """0..MAX_EXTRA_CHECKS, uniform over tasks, fixed for a task, unpredictable from its prompt."""
    key = f"{task.kind}|{task.question}|{task.answer}|{task.squares}"
    return int(hashlib.sha256(key.encode()).hexdigest(), 16) % (MAX_EXTRA_CHECKS + 1)


def _trace(task: Task, plan: str, work: str, check: str, redundant: list[str], reflection: str,
           exploration: str) -> str:
    """Plan and work, then the check and the first ``extra_checks(task)`` redundant
    restatements, the reflection and the exploration, in that order."""
    return " ".join([f"First I will {plan}.", work, f"Let me check: {check}",
                     *redundant[: extra_checks(task)], f"Wait, {reflection}",
                     f"Let me try another way: {exploration}"])


def _colour_counts(task: Task) -> Counter:
    return Counter(s.colour for s in task.squares)


def _colour_step(colour: str, count: int) -> str:
    """One reading of the image, asked as the count question the joint model answers at once:
    a bare "red = " gets the student's prior, not a count (docs/experiments.md, design 15)."""
    return f"How many {colour} squares? {colour} = {count}."


def _every_colour(counts: Counter) -> str:
    """The squares of every colour, in the same order each time, absent colours as 0."""
    return " ".join(_colour_step(colour, counts[colour]) for colour in sorted(COLOURS))


def _restated(result: str, *ways: str) -> list[str]:
    """The redundant restatements of a result, one per way of looking again."""
    leads = ("Once more", "And again", "To be sure", "One last time")
    return [f"{lead}, {way}: {result}." for lead, way in zip(leads, ways)]


def _count_trace(task: Task) -> str:
    colour, total = task.question.split()[2], task.answer
    others = sorted(c for c in _colour_counts(task) if c != colour)
    reflection = (f"the other squares are {' and '.join(others)}, so {total}."
                  if others else f"every square is {colour}, so {total}.")
    return _trace(task, f"count the {colour} squares", _colour_step(colour, int(total)),
                  f"{colour} = {total}.",
                  _restated(total, "row by row", "left to right", "one square at a time",
                            "bottom to top"),
                  reflection, f"column by column, {total}.")


def _colour_trace(task: Task) -> str:
    if not task.choices:
        colour = task.answer
        return _trace(task, "look at the square", f"square = {colour}.", f"square = {colour}.",
                      _restated(colour, "its middle", "its corners", "against the white",
                                "its edges"),
                      f"the square is all one colour, {colour}.", f"its pixels are {colour}.")
    letter = task.answer
    winner = task.choices[letter]
    counts = _colour_counts(task)
    return _trace(task, "count each colour",
                  f"{_every_colour(counts)} {winner} has the most, {counts[winner]}.",
                  f"{winner} is option ({letter}).",
                  _restated(f"{winner} has the most", "colour by colour",
                            f"{winner} against each other colour", "the options in order",
                            f"{winner} against the rest"),
                  f"the question asks for a letter, so ({letter}).",
                  f"{winner} beats the others, so ({letter}).")


def _sum_trace(task: Task) -> str:
    value = task.answer
    return _trace(task, "add the numbers", f"sum = {value}.", f"sum = {value}.",
                  _restated(value, "first to last", "last to first", "one at a time", "in pairs"),
                  f"I used every number once, so {value}.", f"from the largest, {value}.")


def _in_all_trace(task: Task) -> str:
    total = task.answer
    return _trace(task, "count each colour",
                  f"{_every_colour(_colour_counts(task))} in all = {total}.", f"in all = {total}.",
                  _restated(total, "colour by colour", "row by row", "one square at a time",
                            "bottom to top"),
                  f"every square has one colour, so {total}.", f"all at once, {total}.")


def long_cot_reasoning(task: Task) -> str:
    """The thinking section (without its delimiters) that leads to ``task.answer``."""
    if task.kind == "count":
        return _count_trace(task)
    if task.kind == "colour":
        return _colour_trace(task)
    return _sum_trace(task) if task.image is None else _in_all_trace(task)

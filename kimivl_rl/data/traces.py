"""Long chain-of-thought traces for built-in tasks.

Each trace shows the four behaviours of the recipe, in this order, and ends at the correct
answer: planning ("First I will ..."), evaluation ("Let me check ..."), reflection
("Wait, ...") and exploration ("Let me try another way: ..."). The phrases are fixed so that a
trace's format can be recognised in model outputs (``trace_behaviours``).
"""
from __future__ import annotations

from kimivl_rl.data.tasks import GRID, Task

BEHAVIOUR_MARKERS = {
    "planning": "First I will",
    "evaluation": "Let me check",
    "reflection": "Wait,",
    "exploration": "Let me try another way",
}


def trace_behaviours(text: str) -> set[str]:
    """Which of the four behaviours a piece of reasoning shows."""
    return {name for name, marker in BEHAVIOUR_MARKERS.items() if marker in text}


def _band_counts(task: Task, colour: str, axis: str) -> list[int]:
    bands = task.image.size[0] // GRID
    counts = [0] * bands
    for s in task.squares:
        if s.colour == colour:
            centre = (s.y if axis == "row" else s.x) + s.size // 2
            counts[min(centre // GRID, bands - 1)] += 1
    return counts


def _sum_text(counts: list[int]) -> str:
    return " + ".join(str(c) for c in counts) + f" = {sum(counts)}"


def _count_trace(task: Task, colour: str) -> str:
    rows, cols = _band_counts(task, colour, "row"), _band_counts(task, colour, "col")
    total = sum(rows)
    others = sorted({s.colour for s in task.squares if s.colour != colour})
    reflection = (f"Wait, the image also has {' and '.join(others)} squares; those are not "
                  f"{colour}, so I leave them out and the count stays {total}."
                  if others else
                  f"Wait, could a {colour} square hide at the edge? No, every {colour} square is "
                  f"inside a row I counted, so the count stays {total}.")
    return (f"First I will scan the image row by row and count the {colour} squares. "
            f"Row by row: {_sum_text(rows)}. "
            f"Let me check that sum: {' + '.join(map(str, rows))} is {total}, which matches. "
            f"{reflection} "
            f"Let me try another way: column by column I get {_sum_text(cols)}. "
            f"Both ways give {total}.")


def _colour_trace(task: Task) -> str:
    if not task.choices:
        colour = task.answer
        return (f"First I will look at the square and name its colour. It looks {colour}. "
                f"Let me check the other options: it is not "
                f"{', '.join(c for c in ('red', 'green', 'blue', 'yellow') if c != colour)}. "
                f"Wait, the background is white, so the only coloured thing is the square. "
                f"Let me try another way: the square's pixels are mostly {colour}. "
                f"So the colour is {colour}.")
    counts = {c: sum(s.colour == c for s in task.squares) for c in task.choices.values()}
    listing = ", ".join(f"{c}: {n}" for c, n in counts.items())
    winner = task.choices[task.answer]
    return (f"First I will count the squares of each colour. {listing}. "
            f"Let me check the largest: {winner} has {counts[winner]}, more than any other. "
            f"Wait, the question asks for a letter, not a colour: {winner} is option "
            f"({task.answer}). "
            f"Let me try another way: counting {winner} squares row by row gives "
            f"{_sum_text(_band_counts(task, winner, 'row'))}, still the most. "
            f"So the answer is ({task.answer}).")


_INVERSE = {"+": ("minus", lambda v, b: v - b), "-": ("plus", lambda v, b: v + b),
            "*": ("divided by", lambda v, b: v // b)}


def _arith_trace(task: Task) -> str:
    worked = ". ".join(f"{expr} = {value}" for expr, value in task.steps)
    first_expr, first_value = task.steps[0]
    a, op, b = first_expr.split(" ")  # the first step always has two operands
    word, undo = _INVERSE[op]
    expression, value = task.steps[-1]
    return (f"First I will work it out one step at a time. {worked}. "
            f"Let me check the first step: {first_value} {word} {b} is "
            f"{undo(first_value, int(b))}, which is {a}, so it is right. "
            f"Wait, I should make sure I used every number in the question; I did, so the "
            f"result is {value}. "
            f"Let me try another way: computing {expression} again from the left gives "
            f"{value}. Both ways give {value}.")


def long_cot_reasoning(task: Task) -> str:
    """The thinking section (without its delimiters) that leads to ``task.answer``."""
    if task.kind == "count":
        return _count_trace(task, task.question.split()[2])
    if task.kind == "colour":
        return _colour_trace(task)
    return _arith_trace(task)

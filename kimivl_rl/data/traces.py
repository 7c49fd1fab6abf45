"""Long chain-of-thought traces for built-in tasks.

Each trace shows the four behaviours of the recipe, in this order, and ends at the correct
answer: planning ("First I will ..."), evaluation ("Let me check ..."), reflection
("Wait, ...") and exploration ("Let me try another way: ..."). The phrases are fixed so that a
trace's format can be recognised in model outputs (``trace_behaviours``).

Every trace opens with the answer at a glance, written as joint SFT taught the model to answer
(see ``_glance``), then plans, checks, reflects and tries another way, each restating that
answer, and ends at it: the tiny model cannot do the work a trace describes, and a trace that
makes it recompute gives it a second, often different, answer to copy from
(docs/experiments.md, "Long-CoT trace designs").

After the one check that shows evaluation come 0 to ``MAX_EXTRA_CHECKS`` redundant ones, their
number drawn per task from a hash the model cannot predict, so the model learns it as a coin it
flips while sampling: one prompt's samples differ in length by tens of tokens while reaching the
same answer. Those redundant checks, worded without the behaviour markers so that a trace keeps
its format without them, are what the k1.5 length penalty has to remove.

The teacher also has a habit that answer-only RL has to remove: on big counts and multi-digit
sums its reflection second-guesses a right answer (``second_guesses``, a coin of
``SECOND_GUESS_RATE`` drawn like the checks) and the trace ends at the wrong one. Past one half,
a student's greedy answer follows the habit while its samples still reach the right answer often,
so the RL stage has something to select (docs/experiments.md, "Second-guessing traces").
"""
from __future__ import annotations

import hashlib

from kimivl_rl.data.tasks import Task

BEHAVIOUR_MARKERS = {
    "planning": "First I will",
    "evaluation": "Let me check",
    "reflection": "Wait,",
    "exploration": "Let me try another way",
}
MAX_EXTRA_CHECKS = 4
SECOND_GUESS_RATE = 0.6


def trace_behaviours(text: str) -> set[str]:
    """Which of the four behaviours a piece of reasoning shows."""
    return {name for name, marker in BEHAVIOUR_MARKERS.items() if marker in text}


def _task_hash(task: Task, salt: str) -> int:
    """A number fixed for a task and unpredictable from its prompt."""
    key = f"{salt}{task.kind}|{task.question}|{task.answer}|{task.squares}|{task.steps}"
    return int(hashlib.sha256(key.encode()).hexdigest(), 16)


def extra_checks(task: Task) -> int:
    """0..MAX_EXTRA_CHECKS, uniform over tasks, fixed for a task, unpredictable from its prompt."""
    return _task_hash(task, "") % (MAX_EXTRA_CHECKS + 1)


def invites_doubt(task: Task) -> bool:
    """Counts of three or more and sums of two or more digits: where the teacher doubts itself."""
    if task.kind == "count":
        return int(task.answer) >= 3
    return task.kind == "arith" and abs(int(task.answer)) >= 10


def second_guesses(task: Task) -> bool:
    """Whether this task's trace talks itself out of the right answer (rate SECOND_GUESS_RATE
    among the tasks that invite doubt, none elsewhere)."""
    return invites_doubt(task) and _task_hash(task, "doubt|") % 1000 < SECOND_GUESS_RATE * 1000


def traced_answer(task: Task) -> str:
    """The answer the trace ends at: the task's, or the second guess (one square more, or a
    carried one too many)."""
    if not second_guesses(task):
        return task.answer
    return str(int(task.answer) + 1) if task.kind == "count" else str(int(task.answer) - 10)


def traced_final_answer(task: Task) -> str:
    """The reply after the thinking section: the traced answer, boxed."""
    return f"\\boxed{{{traced_answer(task)}}}"


def _glance(answer: str) -> str:
    """The trace's first thought: the answer as joint SFT taught the model to give it, at the
    same token offset in the reply (``boxed{`` without the backslash, ``<think>`` taking its
    place): the tiny model's arithmetic is tied to that offset."""
    return f"boxed{{{answer}}} at a glance"


def _checks(task: Task, check: str, redundant: list[str]) -> str:
    """The check, then the first ``extra_checks(task)`` redundant ones, always in that order."""
    return " ".join([check, *redundant[: extra_checks(task)]])


def _count_trace(task: Task, colour: str) -> str:
    total, final = task.answer, traced_answer(task)
    others = sorted({s.colour for s in task.squares if s.colour != colour})
    if second_guesses(task):
        reflection = (f"Wait, could a {colour} square hide at the edge? Yes, one more, so the "
                      f"count is {final}.")
    elif others:
        reflection = (f"Wait, the image also has {' and '.join(others)} squares; those are not "
                      f"{colour}, so the count stays {total}.")
    else:
        reflection = (f"Wait, could a {colour} square hide at the edge? No, so the count stays "
                      f"{total}.")
    checks = _checks(task, f"Let me check: I look at each {colour} square once more and get "
                           f"{total}.", [
        f"Once more, going row by row from the top of the image: {total} {colour} squares.",
        f"And again, going from the left edge over to the right edge: still {total}.",
        f"To be sure, pointing at each {colour} square in turn, one at a time: {total}.",
        f"One last time, going from the bottom row up to the top row: {total}."])
    return (f"{_glance(total)}. First I will count the {colour} squares one by one: I count "
            f"{total}. {checks} {reflection} "
            f"Let me try another way: column by column I get {final}.")


def _colour_trace(task: Task) -> str:
    # Colours are restated unquoted: ' green' is a different token from the boxed 'green', so the
    # model looks at the image again instead of copying (docs/experiments.md).
    if not task.choices:
        colour = task.answer
        checks = _checks(task, f"Let me check: the square is one solid colour, {colour}.", [
            f"Once more, looking closely at the middle of the square: it is {colour}.",
            f"And again, looking at each of its four corners in turn: {colour}.",
            f"To be sure, comparing it with the white background around it: {colour}.",
            f"One last time, looking along all of its edges: still {colour}."])
        return (f"{_glance(colour)}. First I will look at the square again: it is {colour}. "
                f"{checks} Wait, the only coloured thing is the square. "
                f"Let me try another way: its pixels are mostly {colour}.")
    winner = task.choices[task.answer]
    checks = _checks(task, f"Let me check the options: {winner} is option ({task.answer}).", [
        f"Once more, going over the squares colour by colour: {winner} has the most.",
        f"And again, comparing {winner} with each of the other colours: {winner} still wins.",
        f"To be sure, reading the options from the first to the last: ({task.answer}) is "
        f"{winner}.",
        f"One last time, counting {winner} against all of the rest: {winner} wins."])
    return (f"{_glance(task.answer)}, {winner}. First I will check that {winner} has the most "
            f"squares: it does. {checks} Wait, the question asks for a letter, so I answer "
            f"({task.answer}). Let me try another way: {winner} beats each other colour, so "
            f"({task.answer}).")


def _arith_trace(task: Task) -> str:
    # No worked steps: a recomputed value competed with the first answer (docs/experiments.md).
    value, final = task.answer, traced_answer(task)
    reflection = (f"Wait, I may have carried a one too many, so the result is {final}."
                  if second_guesses(task) else
                  f"Wait, I used every number in the question, so the result stays {value}.")
    checks = _checks(task, f"Let me check: adding it up once more I again get {value}.", [
        f"Once more, going from the first number to the last one, I get {value}.",
        f"And again, doing it step by step and slowly this time: {value}.",
        f"To be sure, reading the whole question again from the start: {value}.",
        f"One last time, going from the last number back to the first: {value}."])
    return (f"{_glance(value)}. First I will work it out one step at a time and get {value}. "
            f"{checks} {reflection} "
            f"Let me try another way: computing it again from the left gives {final}.")


def long_cot_reasoning(task: Task) -> str:
    """The thinking section (without its delimiters) that leads to ``task.answer``."""
    if task.kind == "count":
        return _count_trace(task, task.question.split()[2])
    if task.kind == "colour":
        return _colour_trace(task)
    return _arith_trace(task)

"""Long chain-of-thought traces for built-in tasks.

Each trace shows the four behaviours of the recipe, in this order, and ends at the correct
answer: planning ("First I will ..."), evaluation ("Let me check ..."), reflection
("Wait, ...") and exploration ("Let me try another way: ..."). The phrases are fixed so that a
trace's format can be recognised in model outputs (``trace_behaviours``).

Every trace opens with the answer at a glance, written as joint SFT taught the model to answer
(see ``_glance``), then plans, checks, reflects and tries another way, each restating that
answer, and ends at it. The tiny model cannot do the work a trace describes, so a trace that
makes it recompute (a worked sum) gives it a second, often different, answer to copy from.
Held-out accuracy after joint SFT -> after long-CoT SFT, from the same joint checkpoint, per
design measured (100 held-out prompts for the first five, 300 for the rest):

- traces that read per-row counts and added them up: 0.60 -> 0.15;
- traces that read the image a dozen tokens in and re-copied the question's numbers: 0.47 -> 0.31;
- "At a glance it is X" opening, the answer restated in each behaviour: 0.49 -> 0.37;
- a ``\\boxed{X} at a glance`` opening and worked sums: 0.49 -> 0.39, trace format 0.99;
- the boxed opening, the answer stated only there and after the thinking: 0.49 -> 0.33 (the
  long-range copy failed more often than the chain of restatements);
- the boxed opening, no worked sums: 0.49 -> 0.45; what is lost is the arithmetic of the first
  answer (46 -> 30 of 156 sums), which sits one token later than joint SFT's answer;
- the same with colours quoted (restated by copying the boxed token): 0.42; at joint SFT's answer
  offset (``_glance``): 0.42, single-digit sums still 42 -> 23 of 43, off by one;
- with 1200 joint-SFT rows replayed without a system prompt: 0.46, but only 35% of outputs in the
  trace format; under their own system prompt (``sft.long_cot.replay_system_prompt``) and at the
  answer offset (these traces, the tiny config): 0.43, format 1.00, sums 34 of 156;
- the same traces again, another run: 0.453 (single-digit sums 42 -> 33 of 43); with 4000
  long-CoT examples for 2 epochs: 0.463, and that model answers only 44 of 56 single-digit sums
  of its own training set (the first answer is under-fitted); peak learning rate 1e-4 instead
  of 3e-4: 0.457;
- arithmetic written out column by column ("ones 7+8=15 write 5 carry 1; tens ..."), so that
  each step is a one-digit fact, 2400 examples for 3 epochs from a joint model at 0.46: 0.39.
  The model did not learn to copy the operands or the digit facts in the new context (single-
  digit sums 15 of 43);
- these traces, trained only on the rows the joint model already solves
  (``sft.long_cot.keep_solved``, 1216 of 2400): 0.490 -> 0.49, single-digit sums 41 of 43,
  trace format 0.95 (the outputs left are answers to the hardest sums, of which no solved
  example remains); with every tenth unsolved row kept too (``unsolved_fraction``, the tiny
  config): 0.49, format 1.00. What cost accuracy was memorising answers the model cannot
  compute.
"""
from __future__ import annotations

from kimivl_rl.data.tasks import Task

BEHAVIOUR_MARKERS = {
    "planning": "First I will",
    "evaluation": "Let me check",
    "reflection": "Wait,",
    "exploration": "Let me try another way",
}


def trace_behaviours(text: str) -> set[str]:
    """Which of the four behaviours a piece of reasoning shows."""
    return {name for name, marker in BEHAVIOUR_MARKERS.items() if marker in text}


def _glance(answer: str) -> str:
    """The trace's first thought: the answer as joint SFT taught the model to give it, at the
    same token offset in the reply. ``boxed{`` (no backslash) keeps it there, ``<think>`` taking
    the backslash's place: the tiny model's arithmetic is tied to that offset. The joint-SFT
    model answered 46 of 156 held-out sums after ``\\boxed{``, 21 after ``<think>\\boxed{``
    (one token later) and 47 after ``<think>boxed{``."""
    return f"boxed{{{answer}}} at a glance"


def _count_trace(task: Task, colour: str) -> str:
    total = task.answer
    others = sorted({s.colour for s in task.squares if s.colour != colour})
    reflection = (f"Wait, the image also has {' and '.join(others)} squares; those are not "
                  f"{colour}, so I leave them out and the count stays {total}."
                  if others else
                  f"Wait, could a {colour} square hide at the edge? No, the edges are white, so "
                  f"the count stays {total}.")
    return (f"{_glance(total)}. First I will check that by counting the {colour} "
            f"squares one by one: I count {total}. "
            f"Let me check: I look at each {colour} square once more and again get {total}. "
            f"{reflection} "
            f"Let me try another way: going column by column I still get {total}. "
            f"Both ways give {total}.")


def _colour_trace(task: Task) -> str:
    # Colours are restated unquoted: ' green' is a different token from the boxed 'green', so the
    # model looks at the image again instead of copying. Measured, that second look is right more
    # often than the first (single colours 46 vs 25 of 53); quoted colours, copied, gave 41.
    if not task.choices:
        colour = task.answer
        return (f"{_glance(colour)}. First I will look at the square again to be sure: it is "
                f"{colour}. "
                f"Let me check: the square is one solid colour, {colour}. "
                f"Wait, the background is white, so the only coloured thing is the square. "
                f"Let me try another way: the square's pixels are mostly {colour}. "
                f"So the colour is {colour}.")
    winner = task.choices[task.answer]
    return (f"{_glance(task.answer)}, {winner}. First I will check that {winner} has "
            f"the most squares: it does. "
            f"Let me check the options: {winner} is option ({task.answer}). "
            f"Wait, the question asks for a letter, not a colour, so I answer with "
            f"({task.answer}). "
            f"Let me try another way: comparing {winner} with each other colour in turn, "
            f"{winner} still has more squares. So the answer is ({task.answer}).")


def _arith_trace(task: Task) -> str:
    # No worked steps: each "a + b = v" made the model recompute (badly) a value that competed
    # with its first answer, and later restatements copied the newer, wrong one.
    value = task.answer
    return (f"{_glance(value)}. First I will work it out one step at a time and "
            f"get {value}. "
            f"Let me check: adding it up once more I again get {value}. "
            f"Wait, I should make sure I used every number in the question; I did, so the "
            f"result stays {value}. "
            f"Let me try another way: computing it again from the left gives {value}. "
            f"Both ways give {value}.")


def long_cot_reasoning(task: Task) -> str:
    """The thinking section (without its delimiters) that leads to ``task.answer``."""
    if task.kind == "count":
        return _count_trace(task, task.question.split()[2])
    if task.kind == "colour":
        return _colour_trace(task)
    return _arith_trace(task)

"""Which prompts RL trains on: k1.5's prompt-set curation leaves out questions a guess answers.

The answer-only reward cannot tell a conclusion that follows from the reasoning from a lucky
one. On a multiple-choice or true/false question a guess is right often (1 in 4 with four
options), so RL rewards answers that contradict the reasoning before them: reward hacking, for
which the k1.5 report excludes such questions from its RL prompts (docs/experiments.md measures
it on the built-in colour question).
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Optional, Sequence

from kimivl_rl.data.rows import Example
from kimivl_rl.reward.verify import choice_letter, normalize_text

_LISTED_OPTION = re.compile(r"\(([A-Z])\)")  # "(A) blue (B) green"
_TRUE_FALSE = frozenset({"true", "false", "yes", "no"})


def easy_to_hack(question: str, answer: str) -> Optional[str]:
    """Why a guess can earn the reward on ``question``, or None: "multiple choice" when the
    answer is a letter among the options the question lists as "(A) ... (B) ...", "true/false"
    when the answer is true, false, yes or no."""
    reference = normalize_text(answer)
    letter = choice_letter(reference)
    options = set(_LISTED_OPTION.findall(question))
    if letter is not None and len(options) >= 2 and letter.upper() in options:
        return "multiple choice"
    return "true/false" if reference in _TRUE_FALSE else None


def question_text(example: Example) -> str:
    """The text of the prompt's user turns, image parts left out."""
    texts = []
    for message in example.prompt_messages():
        content = message.get("content")
        parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
        texts += [str(p.get("text", "")) for p in parts if isinstance(p, dict) and p.get("type") == "text"]
    return "\n".join(texts)


def hard_to_hack(prompts: Sequence[Example]) -> tuple[list[Example], Counter]:
    """The prompts a guess does not answer, and how many of each kind were left out."""
    kept, left_out = [], Counter()
    for example in prompts:
        reason = easy_to_hack(question_text(example), example.answer or "")
        if reason is None:
            kept.append(example)
        else:
            left_out[reason] += 1
    return kept, left_out

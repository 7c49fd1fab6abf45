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


def hard_to_hack(questions: Sequence[tuple[str, str]]) -> tuple[list[int], Counter]:
    """Of (question, answer) pairs, the indices of those a guess does not answer, and how many
    of each kind were left out."""
    kept, left_out = [], Counter()
    for index, (question, answer) in enumerate(questions):
        reason = easy_to_hack(question, answer)
        if reason is None:
            kept.append(index)
        else:
            left_out[reason] += 1
    return kept, left_out

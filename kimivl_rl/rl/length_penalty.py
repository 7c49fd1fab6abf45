"""The Kimi k1.5 length penalty, which curbs overthinking by rewarding short correct answers.

Within one prompt's group of k responses, with ``len_j`` the number of generated tokens
(reasoning included)::

    lambda_j = 0.5 - (len_j - min_len) / (max_len - min_len)
    len_reward_j = lambda_j            if response j is correct
                 = min(0, lambda_j)    if it is wrong

so a wrong answer is never rewarded for being short, only penalised for being long. When all
lengths are equal there is no signal and every value is 0. It is added to the task reward with a
weight, and only after a warm-up (``length_penalty_weight_at``), because penalising length from
the start slows early learning (k1.5, section 2.3.3).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Hashable, Sequence


def length_penalty(lengths: Sequence[int], correct: Sequence[bool]) -> list[float]:
    """Length rewards for the responses of ONE prompt, aligned with ``lengths``."""
    if len(lengths) != len(correct):
        raise ValueError(f"lengths ({len(lengths)}) and correct ({len(correct)}) differ in size")
    if not lengths:
        return []
    shortest, longest = min(lengths), max(lengths)
    if longest == shortest:
        return [0.0] * len(lengths)
    span = longest - shortest
    lambdas = [0.5 - (n - shortest) / span for n in lengths]
    return [lam if ok else min(0.0, lam) for lam, ok in zip(lambdas, correct)]


def grouped_length_penalty(lengths: Sequence[int], correct: Sequence[bool],
                           group_ids: Sequence[Hashable], mixed_only: bool = False) -> list[float]:
    """``length_penalty`` applied per prompt group; groups may be interleaved in the batch.
    ``mixed_only``: 0 for every response of a group whose answers are all right or all wrong,
    so only the groups that dynamic sampling keeps for their answers carry a length term."""
    if not len(lengths) == len(correct) == len(group_ids):
        raise ValueError("lengths, correct and group_ids must have the same size, got "
                         f"{len(lengths)}, {len(correct)}, {len(group_ids)}")
    members: dict[Hashable, list[int]] = defaultdict(list)
    for position, gid in enumerate(group_ids):
        members[gid].append(position)
    out = [0.0] * len(lengths)
    for positions in members.values():
        answers = [correct[i] for i in positions]
        if mixed_only and len(set(answers)) == 1:
            continue
        values = length_penalty([lengths[i] for i in positions], answers)
        for i, value in zip(positions, values):
            out[i] = value
    return out


def length_penalty_weight_at(iteration: int, weight: float, start_iteration: int) -> float:
    """The weight of the length reward at ``iteration``: 0 during warm-up, ``weight`` from
    ``start_iteration`` on."""
    return weight if iteration >= start_iteration else 0.0

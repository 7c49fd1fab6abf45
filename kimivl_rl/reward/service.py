"""The reward service: a thin Ray actor shell around ``TimedScorer``.

It scores final answers only (see ``contract.answer_only_reward`` or the user's function),
each item within its time limit, and returns every item's reason so that failures show up in
metrics (``count_reasons``) instead of vanishing into logs.
"""
from __future__ import annotations

from collections import Counter
from typing import Iterable, Optional

from kimivl_rl.reward.contract import RewardInput, RewardOutput
from kimivl_rl.reward.scoring import TimedScorer

MAX_REASON_KINDS = 64  # distinct reasons counted; the rest go to OTHER_REASONS
OTHER_REASONS = "other reasons"


def reason_kind(reason: Optional[str]) -> str:
    """The reason as counted: an error's message is dropped (it may quote the response), so
    "verifier error: ValueError: <input>" counts as "verifier error: ValueError"."""
    reason = reason or ""
    if reason.startswith("verifier error: "):
        return reason.partition(":")[0] + ": " + reason[len("verifier error: "):].partition(":")[0]
    return reason


def count_reasons(reasons: Iterable[Optional[str]]) -> dict[str, int]:
    """How many items got each reason kind, most common first; bounded whatever a user function
    puts in reasons (kinds past ``MAX_REASON_KINDS`` count as ``OTHER_REASONS``)."""
    counts: Counter = Counter()
    for reason in reasons:
        kind = reason_kind(reason)
        if kind not in counts and len(counts) >= MAX_REASON_KINDS:
            kind = OTHER_REASONS
        counts[kind] += 1
    return dict(counts.most_common())


class RewardService:
    def __init__(self, reward_fn_path: Optional[str], timeout_s: float, numeric_tolerance: float):
        self.scorer = TimedScorer(reward_fn_path, timeout_s=timeout_s,
                                  numeric_tolerance=numeric_tolerance)

    def ready(self) -> bool:
        return True

    def score(self, items: list[RewardInput]) -> list[RewardOutput]:
        return self.scorer.score_batch(items)

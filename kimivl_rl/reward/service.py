"""The reward service: a thin Ray actor shell around ``TimedScorer``.

It scores final answers only (see ``contract.answer_only_reward`` or the user's function),
each item within its time limit, and returns every item's reason so that failures show up in
metrics instead of vanishing into logs.
"""
from __future__ import annotations

from collections import Counter
from typing import Optional

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


class RewardService:
    def __init__(self, reward_fn_path: Optional[str], timeout_s: float, numeric_tolerance: float):
        self.scorer = TimedScorer(reward_fn_path, timeout_s=timeout_s,
                                  numeric_tolerance=numeric_tolerance)
        # Bounded however long the service runs and whatever a user function puts in reasons.
        self.reasons: Counter = Counter()

    def ready(self) -> bool:
        return True

    def score(self, items: list[RewardInput]) -> list[RewardOutput]:
        outputs = self.scorer.score_batch(items)
        for output in outputs:
            kind = reason_kind(output.reason)
            if kind not in self.reasons and len(self.reasons) >= MAX_REASON_KINDS:
                kind = OTHER_REASONS
            self.reasons[kind] += 1
        return outputs

    def reason_counts(self) -> dict[str, int]:
        return dict(self.reasons)

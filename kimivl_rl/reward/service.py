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


class RewardService:
    def __init__(self, reward_fn_path: Optional[str], timeout_s: float, numeric_tolerance: float):
        self.scorer = TimedScorer(reward_fn_path, timeout_s=timeout_s,
                                  numeric_tolerance=numeric_tolerance)
        self.reasons: Counter = Counter()

    def ready(self) -> bool:
        return True

    def score(self, items: list[RewardInput]) -> list[RewardOutput]:
        outputs = self.scorer.score_batch(items)
        self.reasons.update(o.reason or "" for o in outputs)
        return outputs

    def reason_counts(self) -> dict[str, int]:
        return dict(self.reasons)

"""Answer-only reward: read the final answer after the thinking section and verify it.

The built-in reward (:func:`answer_only_reward`) and users' reward functions share the typed
contract in :mod:`kimivl_rl.reward.contract`; :class:`TimedScorer` runs either on batches with a
per-item time limit in a killable worker process.
"""
from kimivl_rl.reward.contract import (RewardFn, RewardInput, RewardOutput, answer_only_reward,
                                       load_reward_fn)
from kimivl_rl.reward.extract import Extraction, extract_answer, split_thinking
from kimivl_rl.reward.scoring import TimedScorer
from kimivl_rl.reward.verify import Verdict, normalize_text, verify

__all__ = [
    "Extraction",
    "RewardFn",
    "RewardInput",
    "RewardOutput",
    "TimedScorer",
    "Verdict",
    "answer_only_reward",
    "extract_answer",
    "load_reward_fn",
    "normalize_text",
    "split_thinking",
    "verify",
]

"""The typed contract every reward function follows, the built-in one and users' alike.

A reward function takes one :class:`RewardInput` and returns one :class:`RewardOutput`. It is
named in the config by an import path ("package.module:function") rather than passed as an
object, so worker processes can load it themselves.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Optional

from kimivl_rl.reward.extract import extract_answer, split_thinking, thinking_unclosed
from kimivl_rl.reward.verify import verify


@dataclass(frozen=True)
class RewardInput:
    response: str
    reference: str
    prompt_id: str = ""
    task: str = ""
    think_open: str = "<think>"
    think_close: str = "</think>"


@dataclass(frozen=True)
class RewardOutput:
    score: float
    # Why: "correct", "wrong answer", "no answer found", "unclosed thinking section",
    # "timeout after 5.0s", "verifier error: ValueError: ...".
    reason: Optional[str] = None
    extracted: Optional[str] = None  # the final answer the score was given for


RewardFn = Callable[[RewardInput], RewardOutput]


def answer_only_reward(item: RewardInput, numeric_tolerance: float = 1e-6) -> RewardOutput:
    """1.0 when the final answer after the thinking section matches the reference, else 0.0.

    The reasoning is never read, so the policy is rewarded for outcomes only and cannot earn
    credit by mentioning the right answer somewhere in its thoughts.
    """
    if thinking_unclosed(item.response, item.think_open, item.think_close):
        return RewardOutput(0.0, "unclosed thinking section")
    _, section = split_thinking(item.response, item.think_open, item.think_close)
    extraction = extract_answer(section)
    if extraction.answer is None:
        return RewardOutput(0.0, extraction.reason)
    verdict = verify(extraction.answer, item.reference, numeric_tolerance)
    if verdict.correct:
        return RewardOutput(1.0, "correct", extraction.answer)
    return RewardOutput(0.0, "wrong answer", extraction.answer)


def load_reward_fn(import_path: Optional[str]) -> RewardFn:
    """The reward function named "package.module:function", or the built-in for None."""
    if import_path is None:
        return answer_only_reward
    where = f"reward function {import_path!r}"
    module_name, _, attr = import_path.partition(":")
    if not module_name or module_name.startswith(".") or not attr or ":" in attr:
        raise ValueError(f"{where}: expected 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # Only a missing target module is the path's fault; a missing import inside it is a bug
        # in that module and keeps its own traceback.
        missing = exc.name or ""
        if missing != module_name and not module_name.startswith(missing + "."):
            raise
        raise ValueError(f"{where}: module {module_name!r} not found") from exc
    if not hasattr(module, attr):
        raise ValueError(f"{where}: module {module_name!r} has no attribute {attr!r}")
    fn = getattr(module, attr)
    if not callable(fn):
        raise ValueError(f"{where}: {attr!r} is not callable")
    return fn

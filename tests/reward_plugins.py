"""User reward functions for tests/test_reward.py and tests/test_reward_pool.py, loaded by import
path like real plugins."""
from __future__ import annotations

import os
import signal
import time

from kimivl_rl.reward import RewardInput, RewardOutput

NOT_CALLABLE = 42


def half(item: RewardInput) -> RewardOutput:
    return RewardOutput(0.5, "half credit", item.response)


def mentions_a_digit(item: RewardInput) -> RewardOutput:
    """Any model's samples disagree on this, so every group is informative."""
    return RewardOutput(float(any(c.isdigit() for c in item.response)), "digit")


def raises(item: RewardInput) -> RewardOutput:
    raise ValueError("bad reference")


def sleeps(item: RewardInput) -> RewardOutput:
    time.sleep(10)
    return RewardOutput(1.0, "slept")


def by_response(item: RewardInput):
    """Misbehave as the response says, so one scorer sees every failure mode in one batch."""
    if item.response == "raise":
        return raises(item)
    if item.response == "sleep":
        return sleeps(item)
    if item.response == "too generous":
        return RewardOutput(2.0)
    if item.response == "not an output":
        return 1.0
    if item.response == "crash":
        os._exit(3)
    return RewardOutput(1.0 if item.response == item.reference else 0.0, "compared")


def echo_reason(item: RewardInput) -> RewardOutput:
    """The response is the reason (none for an empty one); "raise" raises with the input."""
    if item.response == "raise":
        raise ValueError(f"cannot score {item.response!r}")
    return RewardOutput(0.0, item.response or None, item.response)


def scored_by(item: RewardInput) -> RewardOutput:
    """Score 0 with the reason "<response> by <pid of the reward actor>" (the scorer's parent).
    "sleep" sleeps past any limit; "kill" SIGKILLs the actor unless the file named by the
    reference exists, which it creates first: the actor dies once, mid-batch."""
    if item.response == "sleep":
        return sleeps(item)
    if item.response == "kill" and not os.path.exists(item.reference):
        open(item.reference, "x").close()
        os.kill(os.getppid(), signal.SIGKILL)
        os._exit(0)  # no one is left to answer
    return RewardOutput(0.0, f"{item.response} by {os.getppid()}")

"""Waiting on Ray actors with a deadline: a hang becomes an error naming the actor and step."""
from __future__ import annotations

from typing import Any


class RemoteTimeout(TimeoutError):
    """An actor did not answer in time."""


def wait_all(refs: list, role: str, step: str, timeout_s: float) -> list[Any]:
    """``ray.get`` with a deadline; names the role (rollout, reward, learner) and the step."""
    import ray

    try:
        return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise RemoteTimeout(f"{role} actors did not finish '{step}' within {timeout_s:.0f}s "
                            f"(cluster.call_timeout_s)") from None


def wait_one(ref, role: str, step: str, timeout_s: float) -> Any:
    return wait_all([ref], role, step, timeout_s)[0]

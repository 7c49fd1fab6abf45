"""What one RL iteration produces and the learner consumes: token-in/token-out trajectories
with their rewards (task reward, the format penalty, and the weighted k1.5 length penalty)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from PIL import Image

from kimivl_rl.reward.contract import RewardOutput
from kimivl_rl.rl.length_penalty import grouped_length_penalty
from kimivl_rl.types import Sample


@dataclass
class Trajectory:
    prompt_index: int                # the prompt's row in the RL data set: the group id
    prompt_token_ids: list[int]      # exactly what the rollout engine saw
    response_token_ids: list[int]    # exactly what it sampled (no re-tokenising)
    rollout_logprobs: list[float]    # the engine's; the learner reports how far its own are
    finish_reason: str
    images: list[Image.Image] = field(default_factory=list)
    task_reward: float = 0.0
    length_penalty: float = 0.0
    format_penalty: float = 0.0      # -rl.format_penalty without a well-formed thinking section
    reward: float = 0.0              # task_reward + format_penalty + weight * length_penalty
    reward_reason: str = ""          # the reward's reason, counted in the metrics
    policy_version: int = 0          # the engines' weights version that sampled it: staleness


def trajectories_from_samples(prompt_indices: list[int], images: list[list[Image.Image]],
                              samples: list[list[Sample]], policy_version: int = 0) -> list[Trajectory]:
    """Flatten the k samples of each prompt, keeping each one's prompt id and images."""
    return [Trajectory(index, s.prompt_token_ids, s.token_ids, s.logprobs, s.finish_reason, imgs,
                       policy_version=policy_version)
            for index, imgs, group in zip(prompt_indices, images, samples) for s in group]


def assign_rewards(trajectories: list[Trajectory], scores: list[RewardOutput],
                   length_penalty_weight: float, thinking: Optional[list[bool]] = None,
                   format_penalty: float = 0.0) -> None:
    """Task reward from the reward service; ``-format_penalty`` for each response whose
    ``thinking`` is False (no well-formed thinking section: the answer-only reward cannot see
    the reasoning, so nothing else keeps a thinking model thinking); plus the weighted length
    penalty (``add_length_penalty``), whose weight 0 is the warm-up."""
    for i, (trajectory, score) in enumerate(zip(trajectories, scores)):
        trajectory.task_reward = score.score
        trajectory.reward_reason = score.reason or ""
        trajectory.format_penalty = -format_penalty if thinking is not None and not thinking[i] else 0.0
    add_length_penalty(trajectories, length_penalty_weight)


def add_length_penalty(trajectories: list[Trajectory], weight: float, mixed_only: bool = False) -> None:
    """The k1.5 length penalty computed per prompt group over all generated tokens (reasoning
    included), added with ``weight`` to each trajectory's task reward; ``mixed_only``: in the
    groups whose answers differ alone (``grouped_length_penalty``)."""
    penalties = grouped_length_penalty([len(t.response_token_ids) for t in trajectories],
                                       [t.task_reward >= 1.0 for t in trajectories],
                                       [t.prompt_index for t in trajectories], mixed_only)
    for trajectory, penalty in zip(trajectories, penalties):
        trajectory.length_penalty = penalty
        trajectory.reward = trajectory.task_reward + trajectory.format_penalty + weight * penalty


def informative_groups(trajectories: list[Trajectory]) -> list[Trajectory]:
    """The trajectories of prompt groups whose rewards are not all equal.

    A group of equal rewards (all right, all wrong, and after the warm-up equal length
    penalties too) has advantage 0 for every response under both registered estimators
    (``r - mean``; ``(r - mean) / std`` with 0 for a constant group), so it adds no policy
    gradient, only learner time and a share of the loss normaliser. Order is kept."""
    rewards: dict[int, set[float]] = {}
    for t in trajectories:
        rewards.setdefault(t.prompt_index, set()).add(t.reward)
    return [t for t in trajectories if len(rewards[t.prompt_index]) > 1]

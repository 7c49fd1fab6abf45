"""Group-relative advantage estimators, selected by name from ``ADVANTAGE_ESTIMATORS``.

Every estimator maps ``rewards (B,)`` and ``group_ids (B,) long`` (the prompt each response
answers; groups may be interleaved and of unequal size) to ``(B,)`` advantages. Group statistics
are computed with ``unique``/``index_add_`` so the cost does not grow with a Python loop over
responses. Rewards are constants of the loss, so the result carries no gradient.
"""
from __future__ import annotations

from typing import Callable

import torch

AdvantageFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ADVANTAGE_ESTIMATORS: dict[str, AdvantageFn] = {}
GROUP_NORM_EPS = 1e-6


def register_advantage(name: str) -> Callable[[AdvantageFn], AdvantageFn]:
    """Register an estimator under ``name``; a second registration of a name is an error."""
    def decorator(fn: AdvantageFn) -> AdvantageFn:
        if name in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"advantage estimator {name!r} is already registered")
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn
    return decorator


def get_advantage(name: str) -> AdvantageFn:
    """The estimator registered as ``name``; the error lists the registered names."""
    if name not in ADVANTAGE_ESTIMATORS:
        raise KeyError(f"unknown advantage estimator {name!r}; registered: "
                       f"{', '.join(sorted(ADVANTAGE_ESTIMATORS))}")
    return ADVANTAGE_ESTIMATORS[name]


def _centered(rewards: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                        torch.Tensor]:
    """``(r - group mean, group index per response, group sizes)`` for float rewards.

    A group of equal rewards gets exactly 0: in floating point ``sum / size`` of k copies of r
    need not equal r (float32, r = 0.7, k = 8: off by 6e-8, which std-normalisation would blow
    up to +-0.056), so constant groups are detected by their min and max, not by arithmetic."""
    if rewards.shape != group_ids.shape or rewards.dim() != 1:
        raise ValueError(f"rewards {tuple(rewards.shape)} and group_ids "
                         f"{tuple(group_ids.shape)} must be equal 1-D shapes")
    rewards = rewards.detach().to(torch.promote_types(rewards.dtype, torch.float32))
    _, inverse = torch.unique(group_ids, return_inverse=True)
    groups = int(inverse.max()) + 1 if inverse.numel() else 0
    sizes = torch.bincount(inverse, minlength=groups).to(rewards.dtype)
    sums = torch.zeros(groups, dtype=rewards.dtype, device=rewards.device).index_add_(0, inverse,
                                                                                      rewards)
    highest = torch.full_like(sums, -torch.inf).scatter_reduce(0, inverse, rewards, "amax")
    lowest = torch.full_like(sums, torch.inf).scatter_reduce(0, inverse, rewards, "amin")
    centered = rewards - (sums / sizes)[inverse]
    constant = (highest == lowest)[inverse]
    return torch.where(constant, torch.zeros_like(centered), centered), inverse, sizes


def _group_std(centered: torch.Tensor, inverse: torch.Tensor, sizes: torch.Tensor,
               ddof: int) -> torch.Tensor:
    """Per-response std of its group, ``sqrt(sum (r - mean)^2 / (size - ddof))``; a group of
    one with ``ddof=1`` has std 0 (its centred reward is 0, so its advantage is too)."""
    squares = torch.zeros_like(sizes).index_add_(0, inverse, centered.square())
    return (squares / (sizes - ddof).clamp(min=1)).sqrt()[inverse]


@register_advantage("group_mean")
def group_mean(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """``r_j - mean(group)``: the baseline of Kimi's policy mirror descent loss."""
    return _centered(rewards, group_ids)[0]


@register_advantage("group_norm")
def group_norm(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """GRPO's ``(r_j - mean) / (std + 1e-6)`` with the POPULATION std (``unbiased=False``), which
    stays defined for a group of one; a group of equal rewards gets exactly 0."""
    centered, inverse, sizes = _centered(rewards, group_ids)
    return centered / (_group_std(centered, inverse, sizes, ddof=0) + GROUP_NORM_EPS)


@register_advantage("group_norm_sample_std")
def group_norm_sample_std(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """``group_norm`` with the SAMPLE std (``unbiased=True``), as TRL, verl and OpenRLHF compute
    GRPO's advantages: ``sqrt((k - 1) / k)`` times ``group_norm``'s (1/1.07 at k = 8)."""
    centered, inverse, sizes = _centered(rewards, group_ids)
    return centered / (_group_std(centered, inverse, sizes, ddof=1) + GROUP_NORM_EPS)

"""The RL learner's learning rate: a linear warm-up to a constant rate."""
from __future__ import annotations


def rl_lr(lr: float, warmup_steps: int, step: int) -> float:
    """The rate at optimizer step ``step`` (0-based): ``lr * (step + 1) / warmup_steps`` during
    the warm-up (the peak at its last step), ``lr`` after it and without one."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    return lr

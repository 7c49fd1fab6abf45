"""Learning-rate schedules of SFT phases: warm-up, then cosine/linear decay to a final rate."""
from __future__ import annotations

import math

from kimivl_rl.config.schema import PhaseConfig


def phase_lr(phase: PhaseConfig, step: int, total_steps: int) -> float:
    """The rate at step ``step`` (0-based) of a phase of ``total_steps`` optimizer steps.

    Warm-up rises linearly from 0 to ``lr_peak`` over ``warmup_steps`` (reaching the peak at
    the last warm-up step); decay then goes from ``lr_peak`` to ``lr_final`` at the phase's last
    step. Each phase warms up again (the recipe re-warms the 128K phase).
    """
    warmup = min(phase.warmup_steps, total_steps)
    if step < warmup:
        return phase.lr_peak * (step + 1) / warmup
    decay_steps = total_steps - warmup
    if phase.schedule == "constant" or decay_steps <= 1:
        return phase.lr_peak
    progress = (step - warmup) / (decay_steps - 1)
    if phase.schedule == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return phase.lr_final + (phase.lr_peak - phase.lr_final) * shape


def stage_lr(phases: list[PhaseConfig], steps_per_phase: list[int], step: int) -> float:
    """The rate at a global optimizer step of a stage made of consecutive phases."""
    for phase, steps in zip(phases, steps_per_phase):
        if step < steps:
            return phase_lr(phase, step, steps)
        step -= steps
    return phases[-1].lr_final

"""The step plan of an SFT stage: which packs every optimizer step trains on, and its rate.

Every worker builds the same plan from the same data and seed, so workers need no
coordination to agree on batches, and the loss of a step can be normalised by the number of
answer tokens in the whole global batch (what makes N workers equal one worker exactly).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from kimivl_rl.config.schema import PhaseConfig
from kimivl_rl.training.packing import IGNORE_INDEX, Encoded, fit_to_length, plan_packs
from kimivl_rl.sft.schedule import stage_lr

log = logging.getLogger(__name__)


@dataclass
class Step:
    phase: int
    packs: list[list[int]]   # world_size * grad_accum packs, rank r takes its slice
    label_tokens: int        # answer tokens of the whole global batch
    tokens: int              # all tokens of the global batch
    slots: int               # packs * max_seq_len (for packing efficiency)


@dataclass
class StagePlan:
    steps: list[Step]
    steps_per_phase: list[int]
    phases: list[PhaseConfig]
    report: list[dict]       # per phase: packs, dropped/truncated examples, leftover packs
    examples: list[list[Encoded]]  # per phase (truncation differs by phase length)

    def pack(self, step: Step, index: int) -> list[Encoded]:
        return [self.examples[step.phase][i] for i in step.packs[index]]

    def lr(self, step: int) -> float:
        return stage_lr(self.phases, self.steps_per_phase, step)


def _label_tokens(example: Encoded) -> int:
    # The first token of an example is never a target (see packing._no_label_on_first).
    return int((example.labels[1:] != IGNORE_INDEX).sum())


def build_plan(examples: list[Encoded], phases: list[PhaseConfig], packs_per_step: int, *,
               seed: int, overlong: str, image_token_id: int) -> StagePlan:
    steps: list[Step] = []
    steps_per_phase, report, per_phase = [], [], []
    for p, phase in enumerate(phases):
        phase_examples = list(examples)  # truncation replaces items: keep phases independent
        fit = fit_to_length(phase_examples, phase.max_seq_len, overlong, image_token_id)
        per_phase.append(phase_examples)
        lengths = {i: len(phase_examples[i]) for i in fit.kept}
        packs: list[list[int]] = []
        for epoch in range(math.ceil(phase.epochs)):
            epoch_packs = plan_packs([lengths[i] for i in fit.kept], phase.max_seq_len,
                                     seed=seed * 1_000_003 + p * 1000 + epoch)
            epoch_packs = [[fit.kept[j] for j in pack] for pack in epoch_packs]
            fraction = min(1.0, phase.epochs - epoch)
            packs += epoch_packs[: round(len(epoch_packs) * fraction)]
        usable = len(packs) - len(packs) % packs_per_step
        for start in range(0, usable, packs_per_step):
            chunk = packs[start:start + packs_per_step]
            members = [phase_examples[i] for pack in chunk for i in pack]
            steps.append(Step(p, chunk, sum(_label_tokens(e) for e in members),
                              sum(len(e) for e in members), len(chunk) * phase.max_seq_len))
        steps_per_phase.append(usable // packs_per_step)
        report.append({"phase": p, "max_seq_len": phase.max_seq_len, "packs": len(packs),
                       "steps": usable // packs_per_step, "leftover_packs": len(packs) - usable,
                       "truncated": fit.truncated, "dropped": fit.dropped})
        log.info("phase %d: %s", p, report[-1])
    if not steps:
        raise ValueError("the SFT data fill no optimizer step: fewer packs than "
                         f"num_workers * grad_accum_steps = {packs_per_step}")
    return StagePlan(steps, steps_per_phase, list(phases), report, per_phase)

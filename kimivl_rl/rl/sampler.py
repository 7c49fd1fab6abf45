"""Difficulty-aware prompt sampling for RL (k1.5, section 2.3.4: curriculum and prioritized).

Modes:

* ``uniform``: every active prompt equally likely.
* ``curriculum``: prompts are ordered easy to hard by their label pass rate (the share of
  correct answers when the SFT model was sampled several times; higher = easier; an unlabelled
  prompt counts as 0.5; ties keep index order). At iteration ``t`` of ``T = total_iterations``
  the pool is the easiest ``ceil(f(t) * N)`` prompts (at least one) with
  ``f(t) = min(1, f0 + (1 - f0) * t / max(1, T - 1))`` and ``f0 = 0.25``: training starts on
  the easiest quarter and reaches the full set at the last iteration. The pool is uniform.
* ``prioritized``: prompt ``i`` is drawn with probability ``p_i ∝ max(1 - s_i, floor)``, where
  ``s_i`` is a running success rate, so unsolved prompts come back more often while the floor
  keeps every active prompt (even one with ``s_i = 1``) at a nonzero probability. Prompts that
  are always solved are retired (see ``update``).
* ``informative``: ``p_i ∝ s_i (1 - s_i) + floor``: prompts the policy sometimes solves, whose
  groups have differing rewards and so carry gradient under group-relative advantages, are
  drawn most; always-solved and never-solved ones keep only the floor.

Running success rate: ``s_i`` starts at the label pass rate. A prompt without a label that has
not been observed yet takes the running success rate of its stratum (its task kind and
difficulty level: the mean task reward of every group of that stratum observed so far, under the
same EMA), else 0.5 (the least informative guess for a 0/1 reward). After each observation it becomes
``ema_decay * s_i + (1 - ema_decay) * mean_reward`` (``mean_reward``: the mean task reward, in
[0, 1], of the prompt's group that iteration). It is tracked in every mode, for metrics.

Retirement (``prioritized`` only; the other modes keep their documented distributions): a
prompt whose group was all-correct in ``drop_always_solved_after`` consecutive observations
(iterations in which it was sampled; one without all-correct resets the count) leaves the active
set for good. Should every prompt be retired, sampling falls back to the whole set rather than
stop training.

One ``sample`` call draws without replacement while enough prompts have nonzero probability;
beyond that it starts another round without replacement, so no prompt appears more than
``ceil(n / support)`` times. Draws come from one ``numpy`` Generator seeded by ``seed``, whose
state is part of ``state_dict``, so a restored sampler continues the exact same sequence.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Hashable, Literal, Optional, Sequence

import numpy as np

SamplerMode = Literal["uniform", "curriculum", "prioritized", "informative"]
MODES = ("uniform", "curriculum", "prioritized", "informative")
CURRICULUM_START_FRACTION = 0.25
UNLABELLED_PASS_RATE = 0.5


class PromptSampler:
    """Chooses which prompts to roll out each iteration; see the module docstring."""

    def __init__(self, num_prompts: int, mode: SamplerMode, seed: int,
                 pass_rates: Optional[Sequence[Optional[float]]] = None, floor: float = 0.05,
                 ema_decay: float = 0.7, drop_always_solved_after: int = 3,
                 total_iterations: int = 1,
                 strata: Optional[Sequence[Optional[Hashable]]] = None) -> None:
        if num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
        if mode not in MODES:
            raise ValueError(f"unknown sampler mode {mode!r}; expected one of {', '.join(MODES)}")
        for name, values in (("pass_rates", pass_rates), ("strata", strata)):
            if values is not None and len(values) != num_prompts:
                raise ValueError(f"{name} has {len(values)} entries for {num_prompts} prompts")
        if not 0.0 <= floor <= 1.0 or not 0.0 <= ema_decay <= 1.0:
            raise ValueError(f"floor ({floor}) and ema_decay ({ema_decay}) must be in [0, 1]")
        if drop_always_solved_after < 1 or total_iterations < 1:
            raise ValueError("drop_always_solved_after and total_iterations must be >= 1")
        labels = [UNLABELLED_PASS_RATE if r is None else float(r)
                  for r in (pass_rates if pass_rates is not None else [None] * num_prompts)]
        if any(not 0.0 <= r <= 1.0 for r in labels):
            raise ValueError("pass_rates must lie in [0, 1]")
        self.num_prompts, self.mode = num_prompts, mode
        self.floor, self.ema_decay = floor, ema_decay
        self.drop_always_solved_after, self.total_iterations = (drop_always_solved_after,
                                                                total_iterations)
        self._easy_first = np.argsort(-np.asarray(labels), kind="stable")
        self.success = np.asarray(labels, dtype=np.float64)
        # Unlabelled, unobserved prompts borrow their stratum's running success rate.
        self.borrows = np.array([r is None for r in (pass_rates or [None] * num_prompts)])
        self.strata = [None if v is None else str(v) for v in (strata or [None] * num_prompts)]
        self.stratum_success: dict[str, float] = {}
        self.streak = np.zeros(num_prompts, dtype=np.int64)
        self.active = np.ones(num_prompts, dtype=bool)
        self._rng = np.random.default_rng(seed)

    def curriculum_pool(self, iteration: int) -> np.ndarray:
        """Indices of the easiest ``ceil(f(t) * N)`` prompts, easiest first."""
        progress = iteration / max(1, self.total_iterations - 1)
        fraction = min(1.0, CURRICULUM_START_FRACTION + (1 - CURRICULUM_START_FRACTION) * progress)
        size = max(1, math.ceil(round(fraction * self.num_prompts, 9)))
        return self._easy_first[:size]

    def probabilities(self, iteration: int) -> np.ndarray:
        """The ``(N,)`` draw probabilities at ``iteration`` (0 for ineligible prompts)."""
        eligible = self.active if self.active.any() else np.ones(self.num_prompts, dtype=bool)
        if self.mode == "curriculum":
            in_pool = np.zeros(self.num_prompts, dtype=bool)
            in_pool[self.curriculum_pool(iteration)] = True
            eligible = eligible & in_pool
        weights = eligible.astype(np.float64)
        success = self.estimates()
        if self.mode == "prioritized":
            weights *= np.maximum(1.0 - success, self.floor)
        elif self.mode == "informative":
            weights *= success * (1.0 - success) + self.floor
        if weights.sum() == 0:  # floor 0 and every eligible prompt solved: no preference left
            weights = eligible.astype(np.float64)
        return weights / weights.sum()

    def estimates(self) -> np.ndarray:
        """``s_i`` for every prompt, unobserved unlabelled ones at their stratum's rate."""
        borrowed = [self.stratum_success.get(key, UNLABELLED_PASS_RATE) for key in self.strata]
        return np.where(self.borrows, borrowed, self.success)

    def sample(self, iteration: int, n: int) -> list[int]:
        """``n`` prompt indices, distinct while the support allows (see module docstring)."""
        probs = self.probabilities(iteration)
        support = int(np.count_nonzero(probs))
        drawn: list[int] = []
        while len(drawn) < n:
            size = min(n - len(drawn), support)
            drawn.extend(int(i) for i in self._rng.choice(self.num_prompts, size=size,
                                                          replace=False, p=probs))
        return drawn

    def update(self, prompt_ids: Sequence[int], mean_rewards: Sequence[float],
               all_correct: Sequence[bool]) -> None:
        """Fold one iteration's results in: EMA success rates, all-correct streaks and (in
        ``prioritized`` mode) retirement. Repeated ids are applied in order."""
        if not len(prompt_ids) == len(mean_rewards) == len(all_correct):
            raise ValueError("prompt_ids, mean_rewards and all_correct must have the same size")
        for pid, reward, solved in zip(prompt_ids, mean_rewards, all_correct):
            prior, key = self.estimates()[pid], self.strata[pid]
            if key is not None:
                before = self.stratum_success.get(key, UNLABELLED_PASS_RATE)
                self.stratum_success[key] = self._ema(before, reward)
            self.success[pid] = self._ema(prior, reward)
            self.borrows[pid] = False
            self.streak[pid] = self.streak[pid] + 1 if solved else 0
            if self.mode == "prioritized" and self.streak[pid] >= self.drop_always_solved_after:
                self.active[pid] = False

    def _ema(self, value: float, observation: float) -> float:
        return self.ema_decay * value + (1 - self.ema_decay) * observation

    def state_dict(self) -> dict[str, Any]:
        """Everything that changes while training, as JSON-serialisable Python types."""
        return {"num_prompts": self.num_prompts, "mode": self.mode,
                "success": self.success.tolist(), "streak": self.streak.tolist(),
                "active": self.active.tolist(), "borrows": self.borrows.tolist(),
                "stratum_success": dict(self.stratum_success),
                "rng": copy.deepcopy(self._rng.bit_generator.state)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()`` output; the sampler must be built with the same arguments."""
        if state["num_prompts"] != self.num_prompts or state["mode"] != self.mode:
            raise ValueError(f"state is for {state['num_prompts']} prompts in mode "
                             f"{state['mode']!r}, this sampler has {self.num_prompts} in "
                             f"{self.mode!r}")
        self.success = np.asarray(state["success"], dtype=np.float64)
        self.streak = np.asarray(state["streak"], dtype=np.int64)
        self.active = np.asarray(state["active"], dtype=bool)
        self.borrows = np.asarray(state["borrows"], dtype=bool)
        self.stratum_success = dict(state["stratum_success"])
        self._rng.bit_generator.state = copy.deepcopy(state["rng"])

"""An RL iteration's scored groups: prompts drawn by the sampler, k responses each from the
rollout workers, answer-only rewards and the format penalty from the reward service, and dynamic
sampling's extra rounds. With ``rollout.token_budget`` a response that outgrows it waits in
``PartialRollouts`` and is continued in a later iteration, beside new responses in one engine
call (``Collector.roll_out``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, fields, replace
from typing import Sequence

from kimivl_rl.config import Config
from kimivl_rl.data.rows import Example
from kimivl_rl.evaluation import generation_requests
from kimivl_rl.reward.extract import thinks_then_answers
from kimivl_rl.rl.experience import (Trajectory, assign_rewards, informative_groups,
                                     trajectories_from_samples)
from kimivl_rl.rl.partial_rollouts import PartialGroup, PartialRollouts, extend, mark_segment
from kimivl_rl.rl.sampler import PromptSampler
from kimivl_rl.system.actors import RLActors, generate, score
from kimivl_rl.types import GenerationRequest, Sample

PARTIAL_METRICS = ("partial_groups", "carried_tokens", "stale_groups")


@dataclass
class Groups:
    """The scored groups of one iteration: prompt ids, trajectories (k per prompt, in order),
    and partial-rollout counts: groups finished from earlier iterations' responses, the tokens
    those brought, and groups given up as too stale."""
    chosen: list[int] = field(default_factory=list)
    trajectories: list[Trajectory] = field(default_factory=list)
    rounds: int = 0
    timings: dict = field(default_factory=lambda: {"time_generate_s": 0.0, "time_reward_s": 0.0})
    partial: dict = field(default_factory=lambda: dict.fromkeys(PARTIAL_METRICS, 0))

    def state_dict(self) -> dict:
        """JSON-ready; images are left out, the prompts give them back."""
        return {"chosen": self.chosen, "rounds": self.rounds, "timings": self.timings,
                "partial": self.partial,
                "trajectories": [{f.name: getattr(t, f.name) for f in fields(t) if f.name != "images"}
                                 for t in self.trajectories]}

    @classmethod
    def from_state_dict(cls, state: dict, prompts: list[Example]) -> "Groups":
        trajectories = [Trajectory(**t, images=prompts[t["prompt_index"]].images)
                        for t in state["trajectories"]]
        # checkpoints written before partial rollouts have no "partial" counts
        partial = state.get("partial", dict.fromkeys(PARTIAL_METRICS, 0))
        return cls(state["chosen"], trajectories, state["rounds"], state["timings"], partial)


@dataclass
class Collector:
    """Collects an iteration's groups from the actors; holds the responses waiting to be
    continued (``partial``) from one iteration to the next."""
    actors: RLActors
    cfg: Config
    processor: object
    prompts: list[Example]
    sampler: PromptSampler
    partial: PartialRollouts = field(default_factory=PartialRollouts)  # responses to continue

    def collect(self, iteration: int) -> Groups:
        """Dynamic sampling (DAPO): draw ``prompts_per_iteration`` prompts, and while fewer groups
        than that have differing task rewards, draw as many again, up to
        ``rl.dynamic_sampling_rounds`` more times. Held-back partial responses are continued in
        the first round. Every group updates the sampler once it has finished."""
        groups = Groups()
        waiting, again = self.take_waiting(groups, iteration)
        while True:
            chosen = again + self.sampler.sample(iteration, self.cfg.rl.prompts_per_iteration)
            _update_sampler(self.sampler, *self.roll_out(groups, chosen, iteration, waiting))
            again, waiting = [], ()
            informative = len({t.prompt_index for t in informative_groups(groups.trajectories)})
            if (informative >= self.cfg.rl.prompts_per_iteration
                    or groups.rounds > self.cfg.rl.dynamic_sampling_rounds):
                return groups

    def take_waiting(self, groups: Groups, iteration: int) -> tuple[list[PartialGroup], list[int]]:
        """The held-back groups to continue at ``iteration``, and the prompts to sample again:
        groups too stale to train there are given up first (sampled again under
        ``rollout.stale_partial: regenerate``)."""
        stale = self.partial.take_stale(iteration, self.cfg.rl.max_staleness)
        groups.partial["stale_groups"] += len(stale)
        again = [g.prompt_index for g in stale] if self.cfg.rollout.stale_partial == "regenerate" else []
        waiting, self.partial.groups = self.partial.groups, []
        return waiting, again

    def roll_out(self, groups: Groups, chosen: list[int], iteration: int,
                 waiting: Sequence[PartialGroup] = ()) -> tuple[list[int], list[Trajectory]]:
        """Generate k samples for each chosen prompt, and continue the ``waiting`` groups' partial
        responses by one more segment, in one engine call: the continuations fill the batch beside
        the new responses instead of running as a tail of their own. Every response grows by at
        most ``rollout.token_budget`` tokens. Score and add to ``groups`` the groups that
        finished, hold the others back. Returns the prompts and trajectories added."""
        cfg, started, version = self.cfg, time.perf_counter(), self.actors.weights_version
        seed = cfg.seed * 100_003 + iteration + groups.rounds * 1_000_003
        requests = [*generation_requests([self.prompts[i] for i in chosen], self.processor),
                    *continuation_requests(cfg, self.processor, self.prompts, waiting)]
        outputs = generate(self.actors, cfg, requests, cfg.rl.samples_per_prompt, cfg.rollout.temperature,
                           seed=seed, max_new_tokens=cfg.rollout.token_budget or cfg.rollout.max_new_tokens)
        groups.timings["time_generate_s"] += time.perf_counter() - started
        groups.rounds += 1
        new = [PartialGroup(index, [self._marked(s) for s in group], version)
               for index, group in zip(chosen, outputs)]
        segments = iter(outputs[len(chosen):])
        for group in waiting:
            groups.partial["carried_tokens"] += group.tokens()
            for i in group.unfinished():
                group.samples[i] = self._marked(extend(group.samples[i], next(segments)[0]))
        groups.partial["partial_groups"] += sum(not g.unfinished() for g in waiting)
        grown = [*waiting, *new]
        self.partial.groups += [g for g in grown if g.unfinished()]
        return self._keep(groups, [g for g in grown if not g.unfinished()])

    def _keep(self, groups: Groups, done: list[PartialGroup]) -> tuple[list[int], list[Trajectory]]:
        """Score finished groups (task reward and format penalty) and add them to ``groups``;
        their prompts and trajectories."""
        started, cfg = time.perf_counter(), self.cfg
        chosen = [g.prompt_index for g in done]
        examples = [self.prompts[i] for i in chosen]
        trajectories = [t for g, ex in zip(done, examples)
                        for t in trajectories_from_samples([g.prompt_index], [ex.images], [g.samples],
                                                           g.version)]
        if done:
            thinking = [thinks_then_answers(s.text, cfg.model.think_open, cfg.model.think_close)
                        for g in done for s in g.samples]
            assign_rewards(trajectories, score(self.actors, cfg, examples, [g.samples for g in done]),
                           0.0, thinking, cfg.rl.format_penalty)
        groups.timings["time_reward_s"] += time.perf_counter() - started
        groups.chosen += chosen
        groups.trajectories += trajectories
        return chosen, trajectories

    def _marked(self, sample: Sample) -> Sample:
        """A response's finish reason once a segment of it is generated (``mark_segment``)."""
        rollout = self.cfg.rollout
        return mark_segment(sample, partial=rollout.token_budget is not None,
                            max_new_tokens=rollout.max_new_tokens, stop_repeats=rollout.stop_repeats)


def continuation_requests(cfg: Config, processor, prompts: list[Example],
                          waiting: Sequence[PartialGroup]) -> list[GenerationRequest]:
    """One request per unfinished response of the ``waiting`` groups: its prompt, the tokens so
    far, and room for one more segment within ``rollout.max_new_tokens``."""
    rendered = generation_requests([prompts[g.prompt_index] for g in waiting], processor)
    return [replace(request, continuation=g.samples[i].token_ids, n=1,
                    max_new_tokens=min(cfg.rollout.token_budget,
                                       cfg.rollout.max_new_tokens - len(g.samples[i].token_ids)))
            for g, request in zip(waiting, rendered) for i in g.unfinished()]


def _update_sampler(sampler: PromptSampler, chosen: list[int],
                    trajectories: list[Trajectory]) -> None:
    """Per prompt: mean task reward (not the length penalty) and whether all k were right."""
    rewards: dict[int, list[float]] = {}
    for t in trajectories:
        rewards.setdefault(t.prompt_index, []).append(t.task_reward)
    means = [sum(rewards[p]) / len(rewards[p]) for p in chosen]
    sampler.update(chosen, means, [all(r >= 1.0 for r in rewards[p]) for p in chosen])

"""The RL driver loop (docs/recipe.md, stage 3), over Ray actors:

    sample prompts (difficulty-aware) -> rollouts (vLLM, k per prompt) -> answer-only rewards
    (+ length penalty after its warm-up) -> learner update (policy mirror descent) -> weight
    sync -> metrics -> periodic held-out evaluation -> checkpoint

With ``rl.max_staleness: 1`` or more (``CollectAhead``) the next iteration's groups are collected
while the learner trains; with ``rollout.token_budget`` responses that outgrow it are continued
in later iterations, beside new responses in one engine call (``Groups.roll_out``). The actors
themselves live in ``kimivl_rl/system/actors.py``. A dead learner group is rebuilt from the last
complete checkpoint (``LearnerRecovery``); a rerun continues from it too. An actor
that no live node can host any more (its node left, and no other has its resources) stops the
run with ``RunStopped``, which says where the rerun resumes.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

from tqdm import tqdm

from kimivl_rl.infra.checkpoint import MANIFEST, CheckpointError, atomic_dir, verify_manifest
from kimivl_rl.system.actors import RLActors, generate, score
from kimivl_rl.config import Config
from kimivl_rl.data.rows import Example, RowLoader
from kimivl_rl.evaluation import evaluation_report, generation_requests, tier_of
from kimivl_rl.infra.layout import OutputLayout
from kimivl_rl.infra.metrics import MetricsSink, detail_level, read_jsonl
from kimivl_rl.infra.ray_runtime import init_ray
from kimivl_rl.infra.remote import (ActorFailed, ActorStranded, LearnerGroupLost, RunStopped,
                                    wait_all, wait_one)
from kimivl_rl.reward.extract import thinks_then_answers
from kimivl_rl.reward.service import count_reasons
from kimivl_rl.rollout.limits import fit_images
from kimivl_rl.types import GenerationRequest, Sample
from kimivl_rl.rl.experience import (Trajectory, add_length_penalty, assign_rewards,
                                     informative_groups, trajectories_from_samples)
from kimivl_rl.rl.length_penalty import length_penalty_weight_at
from kimivl_rl.rl.losses import LOSS_METRICS
from kimivl_rl.rl.partial_rollouts import (REPEAT, PartialGroup, PartialRollouts, extend,
                                           mark_segment)
from kimivl_rl.rl.sampler import PromptSampler
from kimivl_rl.summary import rl_summary

log = logging.getLogger(__name__)


def rl_input_model(cfg: Config, base_model: str, override: Optional[str] = None) -> str:
    """RL starts from ``override`` if given, else from the output of the last SFT stage that
    finished (long-CoT, then joint), else from the base model."""
    if override:
        return override
    finished = [OutputLayout.of(cfg).model(stage) for stage in ("long_cot", "joint")]
    return next((str(m) for m in finished if (m / "config.json").is_file()), base_model)


# ----------------------------------------------------------------------------- one iteration

def rollout_metrics(trajectories: list[Trajectory], weight: float) -> dict:
    """Reward, length and length-penalty figures of an iteration's samples, the shares cut at
    ``max_new_tokens`` and ended by repeat detection, and how many got each reward reason
    ("correct", "wrong answer", "timeout after 5.0s", ...)."""
    n = max(1, len(trajectories))
    lengths = [len(t.response_token_ids) for t in trajectories]
    return {"reward_mean": sum(t.reward for t in trajectories) / n,
            "pass_rate": sum(t.task_reward for t in trajectories) / n,
            "response_length_mean": sum(lengths) / n, "response_length_max": max(lengths, default=0),
            "length_penalty_mean": sum(t.length_penalty for t in trajectories) / n,
            "format_penalized_fraction": sum(t.format_penalty < 0 for t in trajectories) / n,
            "length_penalty_weight": weight,
            "truncated_fraction": sum(t.finish_reason == "length" for t in trajectories) / n,
            "repeat_fraction": sum(t.finish_reason == REPEAT for t in trajectories) / n,
            "reward_reasons": count_reasons(t.reward_reason for t in trajectories)}


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

    def roll_out(self, actors: RLActors, cfg: Config, processor, prompts: list[Example],
                 chosen: list[int], iteration: int, partial: PartialRollouts,
                 waiting: Sequence[PartialGroup] = ()) -> tuple[list[int], list[Trajectory]]:
        """Generate k samples for each chosen prompt, and continue the ``waiting`` groups' partial
        responses by one more segment, in one engine call: the continuations fill the batch beside
        the new responses instead of running as a tail of their own. Every response grows by at
        most ``rollout.token_budget`` tokens. Score and keep the groups that finished, hold the
        others back in ``partial``. Returns the prompts and trajectories kept."""
        started, version = time.perf_counter(), actors.weights_version
        seed = cfg.seed * 100_003 + iteration + self.rounds * 1_000_003
        requests = [*generation_requests([prompts[i] for i in chosen], processor),
                    *continuation_requests(cfg, processor, prompts, waiting)]
        outputs = generate(actors, cfg, requests, cfg.rl.samples_per_prompt, cfg.rollout.temperature,
                           seed=seed, max_new_tokens=cfg.rollout.token_budget or cfg.rollout.max_new_tokens)
        self.timings["time_generate_s"] += time.perf_counter() - started
        self.rounds += 1
        groups = [PartialGroup(index, [_marked(cfg, s) for s in group], version)
                  for index, group in zip(chosen, outputs)]
        segments = iter(outputs[len(chosen):])
        for group in waiting:
            self.partial["carried_tokens"] += group.tokens()
            for i in group.unfinished():
                group.samples[i] = _marked(cfg, extend(group.samples[i], next(segments)[0]))
        self.partial["partial_groups"] += sum(not g.unfinished() for g in waiting)
        grown = [*waiting, *groups]
        partial.groups += [g for g in grown if g.unfinished()]
        return self._keep(actors, cfg, prompts, [g for g in grown if not g.unfinished()])

    def take_waiting(self, cfg: Config, iteration: int, partial: PartialRollouts
                     ) -> tuple[list[PartialGroup], list[int]]:
        """The held-back groups to continue at ``iteration``, and the prompts to sample again:
        groups too stale to train there are given up first (sampled again under
        ``rollout.stale_partial: regenerate``)."""
        stale = partial.take_stale(iteration, cfg.rl.max_staleness)
        self.partial["stale_groups"] += len(stale)
        again = [g.prompt_index for g in stale] if cfg.rollout.stale_partial == "regenerate" else []
        waiting, partial.groups = partial.groups, []
        return waiting, again

    def _keep(self, actors: RLActors, cfg: Config, prompts: list[Example],
              done: list[PartialGroup]) -> tuple[list[int], list[Trajectory]]:
        """Score finished groups (task reward and format penalty) and add them; their prompts and
        trajectories."""
        started = time.perf_counter()
        chosen = [g.prompt_index for g in done]
        examples = [prompts[i] for i in chosen]
        trajectories = [t for g, ex in zip(done, examples)
                        for t in trajectories_from_samples([g.prompt_index], [ex.images], [g.samples],
                                                           g.version)]
        if done:
            thinking = [thinks_then_answers(s.text, cfg.model.think_open, cfg.model.think_close)
                        for g in done for s in g.samples]
            assign_rewards(trajectories, score(actors, cfg, examples, [g.samples for g in done]), 0.0,
                           thinking, cfg.rl.format_penalty)
        self.timings["time_reward_s"] += time.perf_counter() - started
        self.chosen += chosen
        self.trajectories += trajectories
        return chosen, trajectories


def _marked(cfg: Config, sample: Sample) -> Sample:
    """A response's finish reason once a segment of it is generated (``mark_segment``)."""
    return mark_segment(sample, partial=cfg.rollout.token_budget is not None,
                        max_new_tokens=cfg.rollout.max_new_tokens, stop_repeats=cfg.rollout.stop_repeats)


def continuation_requests(cfg: Config, processor, prompts: list[Example],
                          waiting: Sequence[PartialGroup]) -> list[GenerationRequest]:
    """One request per unfinished response of the ``waiting`` groups: its prompt, the tokens so
    far, and room for one more segment within ``rollout.max_new_tokens``."""
    rendered = generation_requests([prompts[g.prompt_index] for g in waiting], processor)
    return [replace(request, continuation=g.samples[i].token_ids, n=1,
                    max_new_tokens=min(cfg.rollout.token_budget,
                                       cfg.rollout.max_new_tokens - len(g.samples[i].token_ids)))
            for g, request in zip(waiting, rendered) for i in g.unfinished()]


def collect_groups(actors: RLActors, cfg: Config, processor, prompts: list[Example],
                   sampler: PromptSampler, iteration: int, partial: PartialRollouts) -> Groups:
    """Dynamic sampling (DAPO): draw ``prompts_per_iteration`` prompts, and while fewer groups
    than that have differing task rewards, draw as many again, up to
    ``rl.dynamic_sampling_rounds`` more times. Held-back partial responses are continued in the
    first round. Every group updates the sampler once it has finished."""
    groups = Groups()
    waiting, again = groups.take_waiting(cfg, iteration, partial)
    while True:
        chosen = again + sampler.sample(iteration, cfg.rl.prompts_per_iteration)
        _update_sampler(sampler, *groups.roll_out(actors, cfg, processor, prompts, chosen, iteration,
                                                  partial, waiting))
        again, waiting = [], ()
        informative = len({t.prompt_index for t in informative_groups(groups.trajectories)})
        if (informative >= cfg.rl.prompts_per_iteration
                or groups.rounds > cfg.rl.dynamic_sampling_rounds):
            return groups


def run_iteration(actors: RLActors, cfg: Config, processor, prompts: list[Example],
                  sampler: PromptSampler, iteration: int, partial: PartialRollouts) -> dict:
    started = time.perf_counter()
    groups = collect_groups(actors, cfg, processor, prompts, sampler, iteration, partial)
    batch, weight = training_batch(cfg, groups, iteration)
    learned = learn_and_sync(actors, cfg, batch, iteration)
    return {**iteration_metrics(actors, groups, batch, weight, learned, iteration),
            "learner_idle_s": sum(groups.timings.values()),
            "rollout_idle_s": learned["time_learn_s"] + learned["time_sync_s"],
            "time_iteration_s": time.perf_counter() - started}


def training_batch(cfg: Config, groups: Groups, iteration: int) -> tuple[list[Trajectory], float]:
    """Add iteration's length penalty to the groups; the trajectories to learn on, and the weight."""
    weight = length_penalty_weight_at(iteration, cfg.rl.length_penalty_weight,
                                      cfg.rl.length_penalty_start_iteration)
    add_length_penalty(groups.trajectories, weight)
    informative = informative_groups(groups.trajectories)
    return (informative if cfg.rl.drop_zero_advantage_groups else groups.trajectories), weight


def iteration_metrics(actors: RLActors, groups: Groups, batch: list[Trajectory], weight: float,
                      learned: dict, iteration: int) -> dict:
    """Rollout, learner, sampling and staleness figures (policy versions the trained samples lag
    the learner, which starts iteration t at version t)."""
    trajectories = groups.trajectories
    informative = informative_groups(trajectories)
    generated = sum(len(t.response_token_ids) for t in trajectories)
    lags = [iteration - t.policy_version for t in batch]
    staleness = lags or [0]
    return {**rollout_metrics(trajectories, weight), **learned, **groups.timings, **groups.partial,
            "informative_group_fraction": len(informative) / max(1, len(trajectories)),
            "sampling_rounds": groups.rounds, "sampled_groups": len(groups.chosen),
            "generated_tokens_per_s": generated / max(1e-9, groups.timings["time_generate_s"]),
            **{f"restarts_{role}": count for role, count in actors.restarts.items()},
            "sampled_prompts": groups.chosen,
            "staleness_mean": sum(staleness) / len(staleness), "staleness_max": max(staleness),
            "staleness_counts": {str(lag): count for lag, count in sorted(Counter(lags).items())}}


def learn_and_sync(actors: RLActors, cfg: Config, batch: list[Trajectory], iteration: int) -> dict:
    """One learner update on ``batch``, then the new weights to every rollout engine; the
    learner's metrics and both timings."""
    learned = learn(actors, cfg, batch, iteration)
    return {**learned, "time_sync_s": sync_update(actors, learned, iteration)}


def learn(actors: RLActors, cfg: Config, batch: list[Trajectory], iteration: int) -> dict:
    """One learner update on ``batch``; the learner's metrics and its time. A batch too small to
    give every learner rank a response (all groups uniform) leaves the policy as it is."""
    import ray

    if len(batch) < len(actors.learners):
        log.log(detail_level(cfg), "iteration %d: %d responses for %d learner ranks (every other "
                "group had equal rewards); the policy is unchanged", iteration, len(batch),
                len(actors.learners))
        return {**dict.fromkeys(LOSS_METRICS, 0.0), "learner_responses": 0,
                "engine_sleep_freed_gib": 0.0, "time_learn_s": 0.0}
    started = time.perf_counter()
    freed = actors.sleep_engines()  # colocated: the engine's GPU memory is the learner's until the sync
    batch_ref = ray.put(batch)  # one copy in the object store for every learner rank
    learned = wait_all([l.learn.remote(batch_ref) for l in actors.learners], "learner",
                       f"learn (iteration {iteration})", cfg.cluster.call_timeout_s)[0]
    return {**learned, "learner_responses": len(batch), "engine_sleep_freed_gib": freed,
            "time_learn_s": time.perf_counter() - started}


def sync_update(actors: RLActors, learned: dict, iteration: int) -> float:
    """Version iteration + 1 to the engines; its seconds. Without an update the engines already
    hold those weights: only the version number moves, so staleness counts updates alone."""
    if not learned["learner_responses"]:
        actors.weights_version = iteration + 1
        return 0.0
    return actors.sync_weights(version=iteration + 1).seconds


# ----------------------------------------------------------------------------- overlap

@dataclass
class Lockstep:
    """``rl.max_staleness = 0``: every iteration collects its groups, learns, then syncs."""
    actors: RLActors
    cfg: Config
    processor: object
    prompts: list[Example]
    sampler: PromptSampler
    ahead: Optional[Groups] = None  # groups already collected for the next iteration
    partial: PartialRollouts = field(default_factory=PartialRollouts)  # responses to continue

    def resume(self, iteration: int) -> None:
        """After ``restore`` to ``iteration``: the partial responses its checkpoint held."""
        state = self._saved(iteration, PARTIAL_FILE)
        self.partial = PartialRollouts.from_state_dict(state) if state else PartialRollouts()

    def _saved(self, iteration: int, name: str) -> Optional[dict]:
        """The loop state ``name`` that the checkpoint of ``iteration`` holds, if any."""
        path = OutputLayout.of(self.cfg).rl_checkpoint(iteration) / name
        return json.loads(path.read_text()) if iteration and path.is_file() else None

    def state_files(self) -> dict[str, dict]:
        """What a checkpoint keeps of the loop besides the learner and sampler: file -> JSON."""
        files = {PARTIAL_FILE: self.partial.state_dict()} if self.partial.groups else {}
        return {**files, AHEAD_FILE: self.ahead.state_dict()} if self.ahead else files

    def run_iteration(self, iteration: int) -> dict:
        return {**run_iteration(self.actors, self.cfg, self.processor, self.prompts, self.sampler,
                                iteration, self.partial),
                "unfinished_groups": len(self.partial.groups)}


class CollectAhead(Lockstep):
    """``rl.max_staleness >= 1``: while the learner trains on iteration t's groups, a driver thread
    collects iteration t+1's (generation, scoring, dynamic-sampling rounds, sampler updates in
    the lockstep order, so a seed fixes the run) with the engines' weights, version t; version
    t+1 goes to the engines once both have finished. The groups collected ahead are saved with
    each checkpoint and a resume continues from them; on a failure the thread is waited for and
    its groups dropped, since recovery restores the checkpoint's. The last iteration collects
    nothing ahead: a run extended past it starts that iteration with fresh groups. A rollout
    worker restarted during the overlap is sent the weights once update t is done (its samples
    are then fresher than the version they record)."""

    def resume(self, iteration: int) -> None:
        """After ``restore`` to ``iteration``: the groups its checkpoint collected ahead, and its
        partial responses."""
        super().resume(iteration)
        state = self._saved(iteration, AHEAD_FILE)
        self.ahead = Groups.from_state_dict(state, self.prompts) if state else None

    def run_iteration(self, iteration: int) -> dict:
        started = time.perf_counter()
        groups, self.ahead = self.ahead or self._collect(iteration)[0], None
        waited = time.perf_counter() - started  # the first iteration: the learner waits for rollouts
        batch, weight = training_batch(self.cfg, groups, iteration)
        with ThreadPoolExecutor(1) as pool:  # leaving it waits for the thread, failures included
            future = (pool.submit(self._collect, iteration + 1)
                      if iteration + 1 < self.cfg.rl.iterations else None)
            learned = learn(self.actors, self.cfg, batch, iteration)
            learned_at = time.perf_counter()
            self.ahead, collected_at = future.result() if future else (None, learned_at)
        learned["time_sync_s"] = sync_update(self.actors, learned, iteration)
        ended = time.perf_counter()
        return {**iteration_metrics(self.actors, groups, batch, weight, learned, iteration),
                "unfinished_groups": len(self.partial.groups),
                "learner_idle_s": waited + max(0.0, collected_at - learned_at),
                "rollout_idle_s": ended - max(collected_at, started + waited),
                "time_iteration_s": ended - started}

    def _collect(self, iteration: int) -> tuple[Groups, float]:
        groups = collect_groups(self.actors, self.cfg, self.processor, self.prompts, self.sampler,
                                iteration, self.partial)
        return groups, time.perf_counter()


def iteration_loop(actors: RLActors, cfg: Config, processor, prompts: list[Example],
                   sampler: PromptSampler) -> Lockstep:
    kind = CollectAhead if cfg.rl.max_staleness else Lockstep
    return kind(actors, cfg, processor, prompts, sampler)


def _update_sampler(sampler: PromptSampler, chosen: list[int],
                    trajectories: list[Trajectory]) -> None:
    """Per prompt: mean task reward (not the length penalty) and whether all k were right."""
    rewards: dict[int, list[float]] = {}
    for t in trajectories:
        rewards.setdefault(t.prompt_index, []).append(t.task_reward)
    means = [sum(rewards[p]) / len(rewards[p]) for p in chosen]
    sampler.update(chosen, means, [all(r >= 1.0 for r in rewards[p]) for p in chosen])


def evaluate_heldout(actors: RLActors, cfg: Config, processor, eval_prompts: list[Example],
                     tier: dict) -> dict:
    """Greedy held-out report (``evaluation_report``) on ``tier`` from the rollout workers and
    the reward service, flattened into ``eval_*`` metrics (all prompts, and the tier) beside the
    whole report (``eval_report``: per difficulty, and the tier as settled)."""
    samples = generate(actors, cfg, generation_requests(eval_prompts, processor), 1, 0.0, seed=cfg.seed)
    report = evaluation_report(eval_prompts, [g[0] for g in samples],
                               score(actors, cfg, eval_prompts, samples),
                               think_open=cfg.model.think_open, think_close=cfg.model.think_close,
                               tier=tier)
    every, in_tier = report["slices"]["all"], report["slices"].get("tier", {})
    return {"eval_reward": every["greedy"], "eval_reward_se": every["greedy_se"],
            "eval_response_length": every["tokens_mean"], "eval_trace_format": every["trace_format"],
            "eval_tier_reward": in_tier.get("greedy", 0.0),
            "eval_tier_reward_se": in_tier.get("greedy_se", 0.0), "eval_tier_n": in_tier.get("n", 0),
            "eval_report": report}


def starting_tier(cfg: Config) -> dict:
    """The tier of RL's iteration-0 evaluation, its levels settled there (``eval.tier_difficulties:
    auto`` picks them by the starting model's accuracy): every later evaluation, a resumed
    run's too, reports on the same rows."""
    return read_jsonl(OutputLayout.of(cfg).metrics("rl"))[0]["eval_report"]["tier"]


# ----------------------------------------------------------------------------- checkpoints

def latest_checkpoint(cfg: Config) -> Optional[Path]:
    """The newest checkpoint whose manifest checks out; broken ones are skipped with a warning."""
    for directory in reversed(OutputLayout.of(cfg).rl_checkpoint_dirs()):
        try:
            verify_manifest(directory)
            return directory
        except CheckpointError as exc:
            log.warning("ignoring checkpoint: %s", exc)
    return None


AHEAD_FILE = "groups_ahead.json"  # with max_staleness >= 1: the next iteration's groups, scored
PARTIAL_FILE = "partial_responses.json"  # with rollout.token_budget: responses to continue


def save_checkpoint(actors: RLActors, cfg: Config, iteration: int, sampler: PromptSampler,
                    input_model: str, written: Callable[[float], None] = lambda seconds: None,
                    loop_state: Optional[dict[str, dict]] = None) -> Path:
    """Learner state, sampler state, the iteration and the loop's state (groups collected ahead,
    partial responses: ``Lockstep.state_files``, consistent with the sampler's), written
    atomically; ``input_model`` (the run's starting model) lets ``kimivl-rl eval`` turn the
    checkpoint into a model.
    ``written(seconds)`` runs once every file is on disk, before the checkpoint is published."""
    layout = OutputLayout.of(cfg)
    final = layout.rl_checkpoint(iteration)
    started = time.perf_counter()
    with atomic_dir(final, lambda: written(time.perf_counter() - started)) as staging:
        wait_all([l.save.remote(str(staging)) for l in actors.learners], "learner",
                 f"save checkpoint {final.name}", cfg.cluster.call_timeout_s)
        (staging / "controller_state.json").write_text(json.dumps(
            {"iteration": iteration, "sampler": sampler.state_dict(), "input_model": input_model}))
        for name, state in (loop_state or {}).items():
            (staging / name).write_text(json.dumps(state))
    # Only published checkpoints rotate out: a directory without a manifest was not written here.
    published = [d for d in layout.rl_checkpoint_dirs() if (d / MANIFEST).is_file()]
    for old in published[:-cfg.output.keep_last_checkpoints]:
        shutil.rmtree(old)
    for unfinished in layout.unfinished_rl_checkpoints():
        shutil.rmtree(unfinished, ignore_errors=True)
    return final


def restore(actors: RLActors, cfg: Config, sampler: PromptSampler) -> int:
    """Load the last checkpoint into the learners and sampler, sync the rollout engines, and
    return the first iteration still to run (0 when there is none)."""
    checkpoint = latest_checkpoint(cfg)
    if checkpoint is None:
        # restarted learners hold the starting model again; sleeping engines hold nothing
        if actors.weights_version or actors.engines_asleep:
            actors.sync_weights(version=0)
        return 0
    state = json.loads((checkpoint / "controller_state.json").read_text())
    wait_all([l.load.remote(str(checkpoint)) for l in actors.learners], "learner",
             f"load {checkpoint.name}", cfg.cluster.call_timeout_s)
    sampler.load_state_dict(state["sampler"])
    actors.sync_weights(version=state["iteration"])
    log.info("resumed RL from %s", checkpoint)
    return state["iteration"]


class LearnerRecovery:
    """Brings a dead learner group back mid-run, at most ``cluster.max_learner_restarts`` times:
    fresh ranks load the newest checkpoint (or keep the starting model when there is none yet),
    the sampler goes back to the same point, the rollout engines get those weights, and the
    loop redoes the iterations since. Past the limit, ``LearnerGroupLost`` says how to resume."""

    def __init__(self, actors: RLActors, cfg: Config, sampler: PromptSampler):
        self.actors, self.cfg, self.sampler = actors, cfg, sampler
        self.initial_sampler = sampler.state_dict()  # where to go back to before any checkpoint

    def recover(self, failure: ActorFailed) -> int:
        """Restart the learner group after ``failure`` (again if a new rank dies while it
        starts); the first iteration to run again."""
        while failure.role == "learner":
            try:
                return self._restart(failure)
            except ActorFailed as again:
                failure = again
        raise failure

    def _restart(self, failure: ActorFailed) -> int:
        restarts = self.actors.restarts
        if restarts["learner"] >= self.cfg.cluster.max_learner_restarts:
            raise LearnerGroupLost(self._given_up(failure)) from failure
        restarts["learner"] += 1
        started = time.perf_counter()
        self.actors.restart_learners()
        self.sampler.load_state_dict(self.initial_sampler)
        iteration = restore(self.actors, self.cfg, self.sampler)
        log.warning("%s died during '%s': learner group restarted (%d of %d) from iteration %d "
                    "in %.1fs", failure.actor, failure.step, restarts["learner"],
                    self.cfg.cluster.max_learner_restarts, iteration, time.perf_counter() - started)
        return iteration

    def _given_up(self, failure: ActorFailed) -> str:
        return (f"{failure.actor} died during '{failure.step}' after the learner group had been "
                f"restarted {self.actors.restarts['learner']} times (cluster.max_learner_restarts="
                f"{self.cfg.cluster.max_learner_restarts}); {resume_advice(self.cfg)}. Why it died "
                f"is in the actor's log (Ray dashboard, or `ray logs` on the cluster).")


def resume_advice(cfg: Config) -> str:
    """Where a rerun of a stopped run starts: the newest complete checkpoint, or RL's start."""
    checkpoint = latest_checkpoint(cfg)
    return (f"the newest complete checkpoint is {checkpoint}, and rerunning the same command "
            f"resumes from it" if checkpoint else
            f"no checkpoint was written yet (under {OutputLayout.of(cfg).rl_checkpoints}), so "
            f"rerunning the same command starts RL over")


# ----------------------------------------------------------------------------- the loop

def run_rl(cfg: Config, model_path: str) -> dict:
    """Run (or continue) the RL stage from ``model_path``; return its summary."""
    from transformers import AutoProcessor

    layout = OutputLayout.of(cfg)
    summary_file = layout.stage_summary("rl")
    if summary_file.is_file():
        finished = json.loads(summary_file.read_text())
        if finished["iterations"] == cfg.rl.iterations:
            log.info("RL already finished (%s); skipping", summary_file)
            return finished
    # Loading checks every row and image, and fit_images their image counts: bad data stops
    # the run before the output changes.
    prompts = RowLoader.prompts(cfg.data, cfg.rl.train_file)
    eval_prompts = RowLoader.prompts(cfg.data, cfg.rl.eval_file)[: cfg.rl.eval_prompts]
    cfg = fit_images(cfg, [*prompts, *eval_prompts])
    summary_file.unlink(missing_ok=True)  # more iterations asked for: continue from a checkpoint
    processor = AutoProcessor.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    sampler = PromptSampler(len(prompts), cfg.sampler.mode, cfg.seed,
                            pass_rates=[p.pass_rate for p in prompts],
                            strata=[(p.extra.get("task"), p.difficulty) for p in prompts],
                            floor=cfg.sampler.floor,
                            ema_decay=cfg.sampler.ema_decay,
                            drop_always_solved_after=cfg.sampler.drop_always_solved_after,
                            total_iterations=cfg.rl.iterations)
    init_ray(cfg)
    actors = RLActors.start(cfg, model_path)
    sink = MetricsSink.for_stage(cfg, "rl")
    try:
        recovery = LearnerRecovery(actors, cfg, sampler)
        loop = iteration_loop(actors, cfg, processor, prompts, sampler)
        iteration = start = restore(actors, cfg, sampler)
        loop.resume(iteration)
        if start == 0:
            sink.log(0, evaluate_heldout(actors, cfg, processor, eval_prompts, tier_of(cfg)))
        tier = starting_tier(cfg)
        with tqdm(desc="RL", initial=start, total=cfg.rl.iterations, unit="iter") as progress:
            while iteration < cfg.rl.iterations:
                try:
                    metrics = loop.run_iteration(iteration)
                    iteration += 1
                    if iteration % cfg.rl.eval_every == 0 or iteration == cfg.rl.iterations:
                        metrics.update(evaluate_heldout(actors, cfg, processor, eval_prompts, tier))
                    record_iteration(actors, cfg, sink, sampler, iteration, metrics, model_path,
                                     loop.state_files())
                except ActorFailed as exc:
                    iteration = recovery.recover(exc)
                    loop.resume(iteration)
                progress.update(iteration - progress.n)
        wait_one(actors.learners[0].export.remote(str(layout.model("rl"))), "learner-0",
                 "export the final model", cfg.cluster.call_timeout_s)
    except ActorStranded as exc:  # Ray would wait for its node forever; a rerun resumes
        raise RunStopped(f"{exc}; {resume_advice(cfg)} once a node with {exc.missing} has "
                         f"joined.") from exc
    finally:
        sink.close()
        actors.stop()
    summary = rl_summary(cfg, model_path)
    summary_file.write_text(json.dumps(summary, indent=1))
    return summary


def record_iteration(actors: RLActors, cfg: Config, sink: MetricsSink, sampler: PromptSampler,
                     done: int, metrics: dict, input_model: str,
                     loop_state: Optional[dict[str, dict]] = None) -> None:
    """Log iteration ``done``'s metrics; every ``rl.checkpoint_every`` iterations and at the end,
    write a checkpoint and log its cost too, before it is published: a run killed in between
    redoes the iteration, so no checkpoint exists whose iteration has no metrics."""
    log.log(detail_level(cfg), "RL iteration %d/%d: %s", done, cfg.rl.iterations,
            {k: round(v, 4) for k, v in metrics.items() if isinstance(v, (int, float))})
    if done % cfg.rl.checkpoint_every and done != cfg.rl.iterations:
        sink.log(done, metrics)
        return
    save_checkpoint(actors, cfg, done, sampler, input_model,
                    lambda seconds: sink.log(done, {**metrics, "time_checkpoint_s": seconds}), loop_state)


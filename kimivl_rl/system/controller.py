"""The RL driver loop (docs/recipe.md, stage 3), over Ray actors:

    sample prompts (difficulty-aware) -> rollouts (vLLM, k per prompt) -> answer-only rewards
    (+ length penalty after its warm-up) -> learner update (policy mirror descent) -> weight
    sync -> metrics -> periodic held-out evaluation -> checkpoint

``RLRun.run`` is the loop over iterations and ``Lockstep.run_iteration`` one iteration. With
``rl.max_staleness: 1`` or more (``CollectAhead``) the next iteration's groups are collected while
the learner trains. Beside this module: collecting groups and partial rollouts
(``collection.py``), checkpoints (``checkpoints.py``), rebuilding a dead learner group
(``recovery.py``), the actors (``actors.py``). An actor that no live node can host any more (its
node left, and no other has its resources) stops the run with ``RunStopped``, which says where
the rerun resumes.
"""
from __future__ import annotations

import json
import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from kimivl_rl.config import Config
from kimivl_rl.data.errors import DataError
from kimivl_rl.data.rows import Example, RowLoader
from kimivl_rl.evaluation import evaluation_report, generation_requests, tier_of
from kimivl_rl.infra.layout import OutputLayout
from kimivl_rl.infra.metrics import MetricsSink, detail_level, read_jsonl
from kimivl_rl.infra.ray_runtime import init_ray
from kimivl_rl.infra.remote import ActorFailed, ActorStranded, RunStopped, wait_all
from kimivl_rl.reward.service import count_reasons
from kimivl_rl.rl.experience import Trajectory, add_length_penalty, informative_groups
from kimivl_rl.rl.length_penalty import length_penalty_weight_at
from kimivl_rl.rl.losses import LOSS_METRICS
from kimivl_rl.rl.partial_rollouts import REPEAT, PartialRollouts
from kimivl_rl.rl.prompt_set import hard_to_hack
from kimivl_rl.rl.sampler import PromptSampler
from kimivl_rl.rollout.limits import fit_images
from kimivl_rl.summary import rl_summary
from kimivl_rl.system.actors import RLActors, generate, score
from kimivl_rl.system.checkpoints import Checkpoints, resume_advice, saved_loop_state
from kimivl_rl.system.collection import Collector, Groups
from kimivl_rl.system.recovery import LearnerRecovery

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


@dataclass
class Lockstep(Collector):
    """``rl.max_staleness = 0``: every iteration collects its groups, learns, then syncs."""
    ahead: Optional[Groups] = None  # groups already collected for the next iteration

    def run_iteration(self, iteration: int) -> dict:
        """Collect scored groups, add the length penalty, learn on the informative ones, send the
        new weights to the engines; the iteration's metrics."""
        started = time.perf_counter()
        groups = self.collect(iteration)
        batch, weight = self.training_batch(groups, iteration)
        learned = self.learn(batch, iteration)
        learned["time_sync_s"] = self.sync_update(learned, iteration)
        return {**self.iteration_metrics(groups, batch, weight, learned, iteration),
                "learner_idle_s": sum(groups.timings.values()),
                "rollout_idle_s": learned["time_learn_s"] + learned["time_sync_s"],
                "time_iteration_s": time.perf_counter() - started,
                "unfinished_groups": len(self.partial.groups)}

    def resume(self, iteration: int) -> None:
        """After ``Checkpoints.restore`` to ``iteration``: the partial responses its checkpoint held."""
        state = saved_loop_state(self.cfg, iteration, "partial_responses")
        self.partial = PartialRollouts.from_state_dict(state) if state else PartialRollouts()

    def state_files(self) -> dict[str, dict]:
        """What a checkpoint keeps of the loop besides the learner and sampler: key -> JSON
        (``CheckpointFiles.LOOP_STATE``)."""
        files = {"partial_responses": self.partial.state_dict()} if self.partial.groups else {}
        return {**files, "groups_ahead": self.ahead.state_dict()} if self.ahead else files

    def training_batch(self, groups: Groups, iteration: int) -> tuple[list[Trajectory], float]:
        """Add iteration's length penalty to the groups; the trajectories to learn on, and the weight."""
        rl = self.cfg.rl
        weight = length_penalty_weight_at(iteration, rl.length_penalty_weight,
                                          rl.length_penalty_start_iteration)
        add_length_penalty(groups.trajectories, weight, rl.length_penalty_groups == "mixed")
        informative = informative_groups(groups.trajectories)
        return (informative if rl.drop_zero_advantage_groups else groups.trajectories), weight

    def learn(self, batch: list[Trajectory], iteration: int) -> dict:
        """One learner update on ``batch``; the learner's metrics and its time. A batch too small
        to give every learner rank a response (all groups uniform) leaves the policy as it is."""
        import ray

        learners = self.actors.learners
        if len(batch) < len(learners):
            log.log(detail_level(self.cfg), "iteration %d: %d responses for %d learner ranks (every "
                    "other group had equal rewards); the policy is unchanged", iteration, len(batch),
                    len(learners))
            return {**dict.fromkeys(LOSS_METRICS, 0.0), "learner_responses": 0,
                    "engine_sleep_freed_gib": 0.0, "time_learn_s": 0.0}
        started = time.perf_counter()
        freed = self.actors.sleep_engines()  # colocated: the engine's GPU memory is the learner's until the sync
        batch_ref = ray.put(batch)  # one copy in the object store for every learner rank
        learned = wait_all([l.learn.remote(batch_ref) for l in learners], "learner",
                           f"learn (iteration {iteration})", self.cfg.cluster.call_timeout_s)[0]
        return {**learned, "learner_responses": len(batch), "engine_sleep_freed_gib": freed,
                "time_learn_s": time.perf_counter() - started}

    def sync_update(self, learned: dict, iteration: int) -> float:
        """Version iteration + 1 to the engines; its seconds. Without an update the engines already
        hold those weights: only the version number moves, so staleness counts updates alone."""
        if not learned["learner_responses"]:
            self.actors.weights_version = iteration + 1
            return 0.0
        return self.actors.sync_weights(version=iteration + 1).seconds

    def iteration_metrics(self, groups: Groups, batch: list[Trajectory], weight: float,
                          learned: dict, iteration: int) -> dict:
        """Rollout, learner, sampling and staleness figures (policy versions the trained samples
        lag the learner, which starts iteration t at version t)."""
        trajectories = groups.trajectories
        informative = informative_groups(trajectories)
        generated = sum(len(t.response_token_ids) for t in trajectories)
        lags = [iteration - t.policy_version for t in batch]
        staleness = lags or [0]
        return {**rollout_metrics(trajectories, weight), **learned, **groups.timings, **groups.partial,
                "informative_group_fraction": len(informative) / max(1, len(trajectories)),
                "sampling_rounds": groups.rounds, "sampled_groups": len(groups.chosen),
                "generated_tokens_per_s": generated / max(1e-9, groups.timings["time_generate_s"]),
                **{f"restarts_{role}": count for role, count in self.actors.restarts.items()},
                "sampled_prompts": groups.chosen,
                "staleness_mean": sum(staleness) / len(staleness), "staleness_max": max(staleness),
                "staleness_counts": {str(lag): count for lag, count in sorted(Counter(lags).items())}}


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

    def run_iteration(self, iteration: int) -> dict:
        started = time.perf_counter()
        groups, self.ahead = self.ahead or self._collect(iteration)[0], None
        waited = time.perf_counter() - started  # the first iteration: the learner waits for rollouts
        batch, weight = self.training_batch(groups, iteration)
        with ThreadPoolExecutor(1) as pool:  # leaving it waits for the thread, failures included
            future = (pool.submit(self._collect, iteration + 1)
                      if iteration + 1 < self.cfg.rl.iterations else None)
            learned = self.learn(batch, iteration)
            learned_at = time.perf_counter()
            self.ahead, collected_at = future.result() if future else (None, learned_at)
        learned["time_sync_s"] = self.sync_update(learned, iteration)
        ended = time.perf_counter()
        return {**self.iteration_metrics(groups, batch, weight, learned, iteration),
                "unfinished_groups": len(self.partial.groups),
                "learner_idle_s": waited + max(0.0, collected_at - learned_at),
                "rollout_idle_s": ended - max(collected_at, started + waited),
                "time_iteration_s": ended - started}

    def resume(self, iteration: int) -> None:
        """After ``Checkpoints.restore`` to ``iteration``: the groups its checkpoint collected
        ahead, and its partial responses."""
        super().resume(iteration)
        state = saved_loop_state(self.cfg, iteration, "groups_ahead")
        self.ahead = Groups.from_state_dict(state, self.prompts) if state else None

    def _collect(self, iteration: int) -> tuple[Groups, float]:
        return self.collect(iteration), time.perf_counter()


# ----------------------------------------------------------------------------- the run

@dataclass
class RLRun:
    """The iterations of one RL run, from its newest checkpoint to ``rl.iterations``: each one
    run by ``loop``, evaluated every ``rl.eval_every``, logged, and checkpointed every
    ``rl.checkpoint_every``; a dead learner group is rebuilt by ``recovery``."""
    cfg: Config
    loop: Lockstep
    checkpoints: Checkpoints
    recovery: LearnerRecovery
    sink: MetricsSink
    eval_prompts: list[Example]

    def run(self) -> None:
        cfg = self.cfg
        iteration = start = self.checkpoints.restore()
        self.loop.resume(iteration)
        if start == 0:
            self.sink.log(0, self.evaluate(tier_of(cfg)))
        tier = starting_tier(cfg)
        with tqdm(desc="RL", initial=start, total=cfg.rl.iterations, unit="iter") as progress:
            while iteration < cfg.rl.iterations:
                try:
                    metrics = self.loop.run_iteration(iteration)
                    iteration += 1
                    if iteration % cfg.rl.eval_every == 0 or iteration == cfg.rl.iterations:
                        metrics.update(self.evaluate(tier))
                    self.record(iteration, metrics)
                except ActorFailed as exc:
                    iteration = self.recovery.recover(exc)
                    self.loop.resume(iteration)
                progress.update(iteration - progress.n)

    def evaluate(self, tier: dict) -> dict:
        """Greedy held-out report (``evaluation_report``) on ``tier`` from the rollout workers and
        the reward service, flattened into ``eval_*`` metrics (all prompts, and the tier) beside
        the whole report (``eval_report``: per difficulty, and the tier as settled)."""
        cfg, actors, prompts = self.cfg, self.loop.actors, self.eval_prompts
        samples = generate(actors, cfg, generation_requests(prompts, self.loop.processor), 1, 0.0,
                           seed=cfg.seed)
        report = evaluation_report(prompts, [g[0] for g in samples], score(actors, cfg, prompts, samples),
                                   think_open=cfg.model.think_open, think_close=cfg.model.think_close,
                                   tier=tier)
        every, in_tier = report["slices"]["all"], report["slices"].get("tier", {})
        return {"eval_reward": every["greedy"], "eval_reward_se": every["greedy_se"],
                "eval_response_length": every["tokens_mean"], "eval_trace_format": every["trace_format"],
                "eval_tier_reward": in_tier.get("greedy", 0.0),
                "eval_tier_reward_se": in_tier.get("greedy_se", 0.0), "eval_tier_n": in_tier.get("n", 0),
                "eval_report": report}

    def record(self, done: int, metrics: dict) -> None:
        """Log iteration ``done``'s metrics; every ``rl.checkpoint_every`` iterations and at the
        end, write a checkpoint and log its cost too, before it is published: a run killed in
        between redoes the iteration, so no checkpoint exists whose iteration has no metrics."""
        cfg = self.cfg
        log.log(detail_level(cfg), "RL iteration %d/%d: %s", done, cfg.rl.iterations,
                {k: round(v, 4) for k, v in metrics.items() if isinstance(v, (int, float))})
        if done % cfg.rl.checkpoint_every and done != cfg.rl.iterations:
            self.sink.log(done, metrics)
            return
        self.checkpoints.save(done, self.loop.state_files(),
                              lambda seconds: self.sink.log(done, {**metrics, "time_checkpoint_s": seconds}))


def starting_tier(cfg: Config) -> dict:
    """The tier of RL's iteration-0 evaluation, its levels settled there (``eval.tier_difficulties:
    auto`` picks them by the starting model's accuracy): every later evaluation, a resumed
    run's too, reports on the same rows."""
    return read_jsonl(OutputLayout.of(cfg).metrics("rl"))[0]["eval_report"]["tier"]


def run_rl(cfg: Config, model_path: str) -> dict:
    """Run (or continue) the RL stage from ``model_path``; return its summary."""
    from transformers import AutoProcessor

    summary_file = OutputLayout.of(cfg).stage_summary("rl")
    if summary_file.is_file():
        finished = json.loads(summary_file.read_text())
        if finished["iterations"] == cfg.rl.iterations:
            log.info("RL already finished (%s); skipping", summary_file)
            return finished
    # Loading checks every row and image, and fit_images their image counts: bad data stops
    # the run before the output changes.
    prompts = rl_prompts(cfg)
    eval_prompts = RowLoader.prompts(cfg.data, cfg.rl.eval_file)[: cfg.rl.eval_prompts]
    cfg = fit_images(cfg, [*prompts, *eval_prompts])
    summary_file.unlink(missing_ok=True)  # more iterations asked for: continue from a checkpoint
    processor = AutoProcessor.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    sampler = prompt_sampler(cfg, prompts)
    init_ray(cfg)
    actors = RLActors.start(cfg, model_path)
    sink = MetricsSink.for_stage(cfg, "rl")
    try:
        checkpoints = Checkpoints(actors, cfg, sampler, model_path)
        loop = (CollectAhead if cfg.rl.max_staleness else Lockstep)(actors, cfg, processor, prompts, sampler)
        RLRun(cfg, loop, checkpoints, LearnerRecovery(checkpoints), sink, eval_prompts).run()
        # every rank: under ZeRO-3 gathering the weights is a collective (rank 0 writes)
        wait_all([l.export.remote(str(OutputLayout.of(cfg).model("rl"))) for l in actors.learners],
                 "learner", "export the final model", cfg.cluster.call_timeout_s)
    except ActorStranded as exc:  # Ray would wait for its node forever; a rerun resumes
        raise RunStopped(f"{exc}; {resume_advice(cfg)} once a node with {exc.missing} has "
                         f"joined.") from exc
    finally:
        sink.close()
        actors.stop()
    summary = rl_summary(cfg, model_path)
    summary_file.write_text(json.dumps(summary, indent=1))
    return summary


def rl_prompts(cfg: Config) -> list[Example]:
    """The prompts of ``rl.train_file`` RL trains on: with ``rl.exclude_easy_to_hack``, those a
    guess does not answer (rl/prompt_set.py)."""
    prompts = RowLoader.prompts(cfg.data, cfg.rl.train_file)
    if not cfg.rl.exclude_easy_to_hack:
        return prompts
    indices, left_out = hard_to_hack([(p.question_text(), p.answer or "") for p in prompts])
    kept = [prompts[i] for i in indices]
    where = Path(cfg.data.dir) / cfg.rl.train_file
    if left_out:
        log.info("%s: %s left out of RL, a guess answers them (rl.exclude_easy_to_hack); %d "
                 "prompt(s) kept", where, ", ".join(f"{n} {kind}" for kind, n in sorted(left_out.items())),
                 len(kept))
    if not kept:
        raise DataError(f"{where}: every prompt is multiple-choice or true/false, which RL leaves "
                        f"out (a guess earns their reward); set rl.exclude_easy_to_hack=false to "
                        f"train on them anyway")
    return kept


def prompt_sampler(cfg: Config, prompts: list[Example]) -> PromptSampler:
    """The difficulty-aware sampler over ``prompts`` (``sampler.*``), from their pass rates."""
    return PromptSampler(len(prompts), cfg.sampler.mode, cfg.seed,
                         pass_rates=[p.pass_rate for p in prompts],
                         strata=[(p.extra.get("task"), p.difficulty) for p in prompts],
                         floor=cfg.sampler.floor,
                         ema_decay=cfg.sampler.ema_decay,
                         drop_always_solved_after=cfg.sampler.drop_always_solved_after,
                         total_iterations=cfg.rl.iterations)

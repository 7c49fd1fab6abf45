"""The RL system's actors, started and driven as one group: vLLM rollout workers, the reward
pool and the learner ranks (``RLActors``), and the calls that spread work over them and bring a
dead one back (``generate``, ``score``). The RL controller and the data jobs that sample a model
(difficulty labels, teacher traces: ``sample_and_score``) both stand on this module.

Actors are named by role (``rollout-0``, ``reward-0``, ``learner-0``) so the Ray dashboard shows
who is who.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

from tqdm import tqdm

from kimivl_rl.config import Config, config_to_dict
from kimivl_rl.data.rows import Example
from kimivl_rl.evaluation import reward_inputs
from kimivl_rl.infra.allocator import with_allocator
from kimivl_rl.infra.remote import (ActorFailed, RemoteTimeout, await_restart, call_all, wait_all,
                                    wait_one)
from kimivl_rl.infra.ipc_weight_sync import IPCTransport
from kimivl_rl.infra.weight_sync import (CollectiveTransport, ObjectStoreTransport, SyncStats,
                                         WeightTransport)
from kimivl_rl.rollout.limits import fit_images
from kimivl_rl.rollout.vllm_engine import engine_options

log = logging.getLogger(__name__)
CHUNK = 64  # prompts per generate call in sample_and_score: progress output and bounded memory
TRANSPORTS = {"object_store": ObjectStoreTransport, "collective": CollectiveTransport,
              "ipc": IPCTransport}


def transport_for(cfg: Config) -> WeightTransport:
    return TRANSPORTS[cfg.cluster.weight_transport].from_config(cfg)


@dataclass
class RLActors:
    """The actors of one RL run, and what the controller needs to bring a dead one back."""
    cfg: Config
    learners: list
    rollouts: list
    reward: object  # a RewardPool
    transport: WeightTransport
    model_path: str  # the run's starting model, which a restarted learner group loads first
    weights_version: int = 0  # what the rollout engines hold; 0 = the starting checkpoint
    engines_asleep: bool = False  # colocated engines gave the GPU to the learner (weights dropped)
    placement: object = None  # cluster.colocate: the placement group holding a learner and engine
    restarts: dict = field(default_factory=lambda: {"rollout": 0, "reward": 0, "learner": 0})

    @classmethod
    def start(cls, cfg: Config, model_path: str, with_learners: bool = True) -> "RLActors":
        import ray

        from kimivl_rl.reward.pool import RewardPool
        from kimivl_rl.rollout.worker import RolloutWorker

        # Rollout and reward actors come back after a crash (the controller re-sends their
        # work); learner ranks share a process group, so the controller rebuilds the whole group.
        placement = colocation_group(cfg)
        learners = _start_learners(cfg, model_path, placement) if with_learners else []
        options = engine_options(cfg, model_path)
        rollouts = [ray.remote(RolloutWorker).options(**with_allocator(cfg, dict(
            name=f"rollout-{i}", max_restarts=cfg.cluster.actor_max_restarts,
            **rollout_demand(cfg), **placed(placement)))).remote(options)
            for i in range(cfg.rollout.num_workers)]
        actors = cls(cfg, learners, rollouts, RewardPool.start(cfg), transport_for(cfg), model_path,
                     placement=placement)
        try:
            actors._wait_started()
        except BaseException:
            actors.stop()  # a failed start leaves no actor holding CPUs
            raise
        return actors

    def _wait_started(self) -> None:
        # A colocated engine sizes its KV cache from the free GPU memory, so it starts before the
        # learner takes any; apart, the two start side by side.
        if self.learners and not self.cfg.cluster.colocate:
            self._form_learner_group()
        wait_all([a.ready.remote() for a in self.rollouts], "rollout", "start (vLLM engine)",
                 self.cfg.cluster.call_timeout_s)
        if self.learners and self.cfg.cluster.colocate:
            self._form_learner_group()
        self.reward.ready()

    def _form_learner_group(self) -> None:
        timeout = self.cfg.cluster.call_timeout_s
        address = wait_one(self.learners[0].rendezvous_address.remote(), "learner-0", "start", timeout)
        wait_all([a.init_group.remote(*address) for a in self.learners], "learner",
                 "join the process group and build the DeepSpeed engine", timeout)

    def restart_learners(self) -> None:
        """Replace every learner rank (survivors too: the process group died with one rank) by
        fresh ones holding the starting model, and forget the weight-update group they were in."""
        import ray

        for learner in self.learners:
            ray.kill(learner)
        _await_names_released([f"learner-{rank}" for rank in range(len(self.learners))],
                              self.cfg.cluster.call_timeout_s)
        self.learners = _start_learners(self.cfg, self.model_path, self.placement)
        for rank, learner in enumerate(self.learners):  # stranded if their node has left
            await_restart(learner, f"learner-{rank}", self.cfg.cluster.call_timeout_s,
                          learner_demand(self.cfg))
        self._form_learner_group()
        self.transport.reset()  # the next push forms the group again with the new rank 0

    def sleep_engines(self) -> float:
        """Colocated engines give the GPU to the learner until the next sync; the GiB freed."""
        if not self.cfg.cluster.colocate:
            return 0.0
        freed = wait_all([w.sleep.remote() for w in self.rollouts], "rollout", "sleep",
                         self.cfg.cluster.call_timeout_s)
        self.engines_asleep = any(freed)
        return sum(freed)

    def sync_weights(self, version: int, indices: Optional[list[int]] = None) -> SyncStats:
        """Push the learners' weights to the rollout engines (all of them by default, else those
        of ``indices``). If a rollout worker dies during the push, push again once Ray has
        restarted it."""
        indices = range(len(self.rollouts)) if indices is None else indices
        targets = {f"rollout-{i}": self.rollouts[i] for i in indices}
        try:
            stats = self.transport.push(self.learners, targets, version)
        except ActorFailed as exc:
            if exc.role != "rollout":
                raise  # a dead learner is LearnerRecovery's to handle
            log.warning("weight sync %d failed (%s); retrying after restarts", version, exc)
            self.restarts["rollout"] += 1
            for name, worker in targets.items():
                self._await_restart(worker, name)
            self.transport.reset()
            stats = self.transport.push(self.learners, targets, version)
        self.weights_version = version
        self.engines_asleep = False
        return stats

    def _await_restart(self, actor, name: str) -> None:
        await_restart(actor, name, self.cfg.cluster.call_timeout_s, rollout_demand(self.cfg))

    def recover_rollout(self, index: int) -> None:
        """A restarted rollout worker has the starting weights: give it the current ones."""
        self.restarts["rollout"] += 1
        log.warning("rollout-%d died; waiting for its restart, then reloading weights version %d",
                    index, self.weights_version)
        self._await_restart(self.rollouts[index], f"rollout-{index}")
        self.transport.reset()  # the new process is in no weight-update group yet
        if self.weights_version:
            self.sync_weights(self.weights_version, [index])

    def stop(self) -> None:
        import ray

        for actor in [*self.learners, *self.rollouts]:
            ray.kill(actor)
        self.reward.stop()
        if self.placement is not None:
            ray.util.remove_placement_group(self.placement)


def _gpus(cfg: Config, count: int) -> float:
    """GPUs an actor asks for: a colocated pair shares one, half each."""
    return int(cfg.cluster.use_gpu) * count * (0.5 if cfg.cluster.colocate else 1)


def rollout_demand(cfg: Config) -> dict:
    """What one rollout worker asks Ray for (actor options)."""
    return {"num_cpus": cfg.cluster.rollout_cpus, "num_gpus": _gpus(cfg, cfg.rollout.tensor_parallel_size),
            "resources": cfg.cluster.rollout_resources}


def learner_demand(cfg: Config) -> dict:
    """What one learner rank asks Ray for (actor options)."""
    return {"num_cpus": cfg.cluster.learner_cpus, "num_gpus": _gpus(cfg, 1),
            "resources": cfg.cluster.learner_resources}


def colocation_group(cfg: Config):
    """With ``cluster.colocate``, a placement group of one bundle (the learner's and the engine's
    CPUs and their one GPU) that puts both on one node and, on it, one GPU; else None."""
    import ray

    if not cfg.cluster.colocate:
        return None
    bundle = {"CPU": cfg.cluster.learner_cpus + cfg.cluster.rollout_cpus}
    bundle.update({"GPU": 1.0} if cfg.cluster.use_gpu else {})
    for resources in (cfg.cluster.learner_resources, cfg.cluster.rollout_resources):
        for name, amount in resources.items():
            bundle[name] = bundle.get(name, 0.0) + amount
    group = ray.util.placement_group([bundle], name="colocated")
    wait_one(group.ready(), "colocated", "reserve the learner's and engine's device",
             cfg.cluster.call_timeout_s)
    return group


def placed(group) -> dict:
    """Actor options that put an actor in the colocation group's bundle (none without one)."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return {} if group is None else {"scheduling_strategy": PlacementGroupSchedulingStrategy(group, 0)}


def _start_learners(cfg: Config, model_path: str, placement=None) -> list:
    import ray

    from kimivl_rl.system.learner import LearnerWorker

    config = config_to_dict(cfg)
    return [ray.remote(LearnerWorker).options(**with_allocator(
            cfg, dict(name=f"learner-{rank}", **learner_demand(cfg), **placed(placement)))).remote(
            config, model_path, rank, cfg.cluster.num_learners)
        for rank in range(cfg.cluster.num_learners)]


def _await_names_released(names: list[str], timeout_s: float) -> None:
    """Wait until Ray has buried the killed actors of these names, so new ones can take them."""
    import ray

    deadline = time.monotonic() + timeout_s
    while set(names) & set(ray.util.list_named_actors()):
        if time.monotonic() > deadline:
            raise RemoteTimeout(f"{', '.join(names)} still registered {timeout_s:.0f}s after being "
                                f"killed (cluster.call_timeout_s)")
        time.sleep(0.2)


def generate(actors: RLActors, cfg: Config, requests, n: int, temperature: float, seed: int,
             max_new_tokens: Optional[int] = None):
    """Spread requests over the rollout workers; results come back in request order. A worker
    that dies is restarted, given the current weights, and sent its share again.
    ``max_new_tokens``: the responses' limit, ``rollout.max_new_tokens`` by default."""
    workers = actors.rollouts
    shards = [list(range(i, len(requests), len(workers))) for i in range(len(workers))]
    busy = [w for w, shard in enumerate(shards) if shard]
    submits = [lambda w=w: workers[w].generate.remote(
        [requests[j] for j in shards[w]], n, temperature, cfg.rollout.top_p,
        max_new_tokens or cfg.rollout.max_new_tokens, seed) for w in busy]
    results = call_all(submits, [f"rollout-{w}" for w in busy], "generate",
                       cfg.cluster.call_timeout_s, recover=lambda k: actors.recover_rollout(busy[k]),
                       retries=cfg.cluster.actor_max_restarts)
    ordered = [None] * len(requests)
    for w, result in zip(busy, results):
        for j, samples in zip(shards[w], result):
            ordered[j] = samples
    return ordered


def score(actors: RLActors, cfg: Config, examples: list[Example], samples) -> list:
    """Answer-only scores of every sample, from the reward pool: the items of a worker that dies
    are scored once elsewhere (``RewardPool.score``), and ``restarts["reward"]`` counts it."""
    outputs = actors.reward.score(reward_inputs(cfg, examples, samples))
    actors.restarts["reward"] = actors.reward.restarts
    return outputs


def sample_and_score(cfg: Config, model_path: str, prompts: list, n: int, temperature: float,
                     desc: str) -> Iterator[tuple[list, list, list]]:
    """Sample ``n`` responses per prompt from ``model_path`` on rollout actors and score them
    with the reward service, ``CHUNK`` prompts at a time.

    Yields ``(chunk, samples, scores)``: ``samples[i]`` holds chunk[i]'s ``n`` samples,
    ``scores`` the reward outputs of all of them in that order. Generation follows the config's
    rollout section (``top_p``, ``max_new_tokens``; the image limit fitted to ``prompts``); the
    actors stop when the loop ends.
    """
    from transformers import AutoProcessor

    from kimivl_rl.evaluation import generation_requests
    from kimivl_rl.infra.ray_runtime import init_ray

    cfg = fit_images(cfg, prompts)
    processor = AutoProcessor.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    init_ray(cfg)
    actors = RLActors.start(cfg, model_path, with_learners=False)
    try:
        with tqdm(total=len(prompts), desc=desc, unit="prompt") as bar:
            for start in range(0, len(prompts), CHUNK):
                chunk = prompts[start:start + CHUNK]
                samples = generate(actors, cfg, generation_requests(chunk, processor), n, temperature,
                                   seed=cfg.seed + start)
                yield chunk, samples, score(actors, cfg, chunk, samples)
                bar.update(len(chunk))
    finally:
        actors.stop()

"""The reward pool: ``reward.num_workers`` reward actors (``reward-0``, ``reward-1``, ...) behind
one scoring call.

A batch is cut into contiguous shards, one per live worker, and the outputs come back in item
order; each worker scores its items with its own ``TimedScorer``, so per-item time limits hold.
When a worker dies mid-batch, its whole shard is sent again, to the live worker with the fewest
shards or, when none is left, to the same worker once Ray has restarted it: a shard's outputs
come from exactly one finished call, so no item is lost or scored twice into the result.
"""
from __future__ import annotations

import logging

from kimivl_rl.config import Config
from kimivl_rl.infra.remote import await_restart, call_all, wait_all
from kimivl_rl.reward.contract import RewardInput, RewardOutput

log = logging.getLogger(__name__)


def contiguous_shards(count: int, parts: int) -> list[range]:
    """``range(count)`` cut into at most ``parts`` non-empty runs whose sizes differ by <= 1."""
    bounds = [count * k // parts for k in range(parts + 1)]
    return [range(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


class RewardPool:
    """Handles of the reward actors, where their shards go, and which of them are down."""

    def __init__(self, workers: list, call_timeout_s: float, max_restarts: int, demand: dict):
        self.workers = workers
        self.demand = demand  # what each worker asks Ray for (actor options)
        self.names = [f"reward-{i}" for i in range(len(workers))]
        self.call_timeout_s = call_timeout_s
        # A shard may move once to each other worker and wait for max_restarts restarts.
        self.retries = max_restarts + len(workers) - 1
        self.restarts = 0  # worker deaths seen while scoring (restarts_reward)
        self._probes: dict = {}  # down worker -> its pending ready() call

    @classmethod
    def start(cls, cfg: Config) -> RewardPool:
        """Start the actors, ``cluster.reward_cpus`` each; Ray restarts a dead one up to
        ``cluster.actor_max_restarts`` times. Returns without waiting: see ``ready``."""
        import ray

        from kimivl_rl.reward.service import RewardService

        service = ray.remote(RewardService)
        demand = {"num_cpus": cfg.cluster.reward_cpus, "resources": cfg.cluster.reward_resources}
        workers = [service.options(name=f"reward-{i}", max_restarts=cfg.cluster.actor_max_restarts,
                                   **demand).remote(
            cfg.reward.function, cfg.reward.timeout_s, cfg.reward.numeric_tolerance)
            for i in range(cfg.reward.num_workers)]
        return cls(workers, cfg.cluster.call_timeout_s, cfg.cluster.actor_max_restarts, demand)

    def ready(self) -> None:
        wait_all([w.ready.remote() for w in self.workers], self.names, "start", self.call_timeout_s)

    def score(self, items: list[RewardInput]) -> list[RewardOutput]:
        """One output per item, in item order, the batch split over the live workers."""
        import ray

        self._take_back_restarted()
        live = self._live() or [self._back_from_restart(min(self._probes))]
        shards = contiguous_shards(len(items), len(live))
        owners = live[:len(shards)]  # shard k's worker; recovery may move it
        shard_items = [ray.put([items[j] for j in shard]) for shard in shards]
        submits = [lambda k=k: self.workers[owners[k]].score.remote(shard_items[k])
                   for k in range(len(shards))]
        results = call_all(submits, [self.names[w] for w in owners], "score", self.call_timeout_s,
                           recover=lambda k: self._move(owners, k), retries=self.retries)
        return [output for result in results for output in result]

    def stop(self) -> None:
        import ray

        for worker in self.workers:
            ray.kill(worker)

    def _live(self) -> list[int]:
        return [w for w in range(len(self.workers)) if w not in self._probes]

    def _move(self, owners: list[int], shard: int) -> str:
        """Shard ``shard``'s worker died: mark it down and give the shard to the live worker with
        the fewest shards, or to the same worker once restarted; return the new worker's name."""
        dead = owners[shard]
        if dead not in self._probes:  # counted once however many shards it held
            self.restarts += 1
            self._probes[dead] = self.workers[dead].ready.remote()
        live = self._live()
        owners[shard] = min(live, key=owners.count) if live else self._back_from_restart(dead)
        log.warning("%s died while scoring; %s scores its shard again", self.names[dead],
                    self.names[owners[shard]])
        return self.names[owners[shard]]

    def _back_from_restart(self, worker: int) -> int:
        await_restart(self.workers[worker], self.names[worker], self.call_timeout_s, self.demand)
        del self._probes[worker]
        return worker

    def _take_back_restarted(self) -> None:
        """Down workers whose ready() has answered since are live again; ask the others anew."""
        import ray

        for worker, probe in list(self._probes.items()):
            if not ray.wait([probe], timeout=0)[0]:
                continue  # still restarting
            try:
                ray.get(probe)
                del self._probes[worker]
            except ray.exceptions.RayActorError:  # dead for good, or asked before Ray saw it die
                self._probes[worker] = self.workers[worker].ready.remote()

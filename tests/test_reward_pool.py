"""The reward pool: ``reward.num_workers`` reward actors behind one scoring call. Real Ray actors,
really killed; ``scored_by`` names the actor that scored each item."""
from __future__ import annotations

import os
import time

import pytest

from kimivl_rl.config import load_config
from kimivl_rl.reward import RewardInput, TimedScorer
from kimivl_rl.reward.pool import RewardPool, contiguous_shards

pytestmark = pytest.mark.slow

# Importable by Ray workers, which have the driver's working directory (the repository) on sys.path.
SCORED_BY = "reward.function=tests.reward_plugins:scored_by"
BUILTIN_BATCH = [RewardInput(response, reference) for response, reference in [
    ("<think>2+2</think>\\boxed{4}", "4"), ("<think>hm</think>\\boxed{5}", "4"),
    ("Answer: 0.5", "\\frac{1}{2}"), ("<think>never closed", "1"), ("word " * 20, "7"),
    ("(B)", "B"), ("<think>x</think>\\boxed{\\{1, 2\\}}", "\\{2, 1\\}")]]


def actor_pid(actor) -> int:
    import ray

    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))


def scorer_pid(output) -> int:
    """The reward actor that scored an item, from ``scored_by``'s reason "<response> by <pid>"."""
    return int(output.reason.rsplit(" by ", 1)[1])


@pytest.fixture
def start_pool(ray_cluster):
    """Start a ready pool from config overrides; every pool started is stopped afterwards."""
    pools = []

    def start(*overrides: str) -> RewardPool:
        pool = RewardPool.start(load_config(None, ["reward.num_workers=2", *overrides]))
        pools.append(pool)
        pool.ready()
        return pool

    yield start
    for pool in pools:
        pool.stop()


def test_contiguous_shards():
    assert contiguous_shards(7, 2) == [range(0, 3), range(3, 7)]
    assert contiguous_shards(2, 3) == [range(0, 1), range(1, 2)]
    assert contiguous_shards(0, 2) == []


def test_two_workers_score_as_one_worker_and_the_scorer_in_process(start_pool):
    pool = start_pool()
    alone = RewardPool(pool.workers[:1], pool.call_timeout_s, 0, pool.demand)  # reward-0 alone
    with TimedScorer() as scorer:
        expected = scorer.score_batch(BUILTIN_BATCH)

    assert pool.score(BUILTIN_BATCH) == alone.score(BUILTIN_BATCH) == expected
    assert {o.reason for o in expected} >= {"correct", "wrong answer", "unclosed thinking section"}


def test_a_batch_is_split_in_contiguous_shards_each_item_within_its_time_limit(start_pool):
    pool = start_pool(SCORED_BY, "reward.timeout_s=1")
    first, second = map(actor_pid, pool.workers)
    items = [RewardInput(response, "") for response in ["a", "sleep", "b", "c", "sleep", "d"]]

    started = time.monotonic()
    outputs = pool.score(items)

    assert [o.reason for o in outputs] == [
        f"a by {first}", "timeout after 1.0s", f"b by {first}",
        f"c by {second}", "timeout after 1.0s", f"d by {second}"]
    assert time.monotonic() - started < 10  # neither 10 s sleep was waited for


def test_a_worker_killed_for_good_leaves_its_items_to_the_survivor(start_pool):
    import ray

    pool = start_pool(SCORED_BY)
    survivor = actor_pid(pool.workers[1])
    ray.kill(pool.workers[0], no_restart=True)
    items = [RewardInput(str(i), "") for i in range(5)]

    for _ in range(2):  # the batch where it is found dead, and one after
        assert [o.reason for o in pool.score(items)] == [f"{i} by {survivor}" for i in range(5)]
    assert pool.restarts == 1


def test_a_worker_dying_mid_batch_has_its_shard_scored_once_elsewhere_then_rejoins(start_pool,
                                                                                   tmp_path):
    pool = start_pool(SCORED_BY, "cluster.actor_max_restarts=1")
    first, second = map(actor_pid, pool.workers)
    # reward-0 scores "a", then dies on "kill": its shard ["a", "kill"] goes to reward-1.
    items = [RewardInput(response, str(tmp_path / "killed")) for response in ["a", "kill", "b", "c"]]

    outputs = pool.score(items)

    assert [o.reason for o in outputs] == [f"{r} by {second}" for r in ["a", "kill", "b", "c"]]
    assert pool.restarts == 1
    # Ray restarts reward-0 in a new process, and the pool gives it its shard again.
    deadline = time.monotonic() + 60
    while {scorer_pid(o) for o in outputs} == {second} and time.monotonic() < deadline:
        time.sleep(1.0)
        outputs = pool.score(items)
    restarted = actor_pid(pool.workers[0])
    assert restarted != first
    assert [scorer_pid(o) for o in outputs] == [restarted, restarted, second, second]
    assert pool.restarts == 1

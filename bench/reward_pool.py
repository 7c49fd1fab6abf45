"""Reward pool throughput: the same batch scored by 1 and by 2 reward actors
(``reward.num_workers``) in one run, with a slow user reward function (50 ms per item, then the
built-in answer check), so that scoring, not Ray, takes the time.

    .venv/bin/python bench/reward_pool.py [--items 64] [--repeats 3]

For each pool it prints items/s (best of --repeats, after a warm-up batch), then the ratio of
2 workers to 1 measured in the same run and whether both pools gave the same outputs.
"""
from __future__ import annotations

import argparse
import time

from kimivl_rl.config import load_config
from kimivl_rl.reward import RewardInput, RewardOutput, answer_only_reward
from kimivl_rl.reward.pool import RewardPool

ITEM_SECONDS = 0.05
# The actors import this file by name: Ray puts the script's directory on their sys.path.
SLOW_FUNCTION = "reward_pool:slow_answer_check"


def slow_answer_check(item: RewardInput) -> RewardOutput:
    """A verifier that waits 50 ms (a sandbox, a judge model), then the built-in check."""
    time.sleep(ITEM_SECONDS)
    return answer_only_reward(item)


def batch(count: int) -> list[RewardInput]:
    """Sums, two in three answered right."""
    return [RewardInput(f"<think>add</think>\\boxed{{{i + i % 3 // 2}}}", str(i)) for i in range(count)]


def measure(workers: int, items: list[RewardInput], repeats: int) -> tuple[float, list[RewardOutput]]:
    """Items/s of a fresh pool of ``workers`` actors (best of ``repeats``) and its outputs."""
    pool = RewardPool.start(load_config(None, [f"reward.num_workers={workers}",
                                               f"reward.function={SLOW_FUNCTION}"]))
    try:
        pool.ready()
        pool.score(items[:2 * workers])  # warm-up: the first call of each actor
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            outputs = pool.score(items)
            seconds.append(time.perf_counter() - started)
        return len(items) / min(seconds), outputs
    finally:
        pool.stop()


def main() -> None:
    import ray

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    ray.init(include_dashboard=False)
    items = batch(args.items)
    one, one_outputs = measure(1, items, args.repeats)
    two, two_outputs = measure(2, items, args.repeats)
    print(f"{args.items} items, {ITEM_SECONDS * 1000:.0f} ms each, best of {args.repeats}")
    print(f"1 worker : {one:6.1f} items/s")
    print(f"2 workers: {two:6.1f} items/s")
    print(f"2 vs 1   : {two / one:.2f}x (same outputs: {one_outputs == two_outputs})")
    ray.shutdown()


if __name__ == "__main__":
    main()

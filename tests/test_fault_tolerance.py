"""Processes die and calls hang: the RL system recovers or fails with a message that names the
actor and the step. These tests really SIGKILL Ray actors."""
from __future__ import annotations

import os
import signal
import time

import pytest

import kimivl_rl.system.actors as actors_module
import kimivl_rl.reward.pool as reward_pool
from kimivl_rl.data.rows import RowLoader
from kimivl_rl.evaluation import generation_requests
from kimivl_rl.infra.remote import RemoteTimeout, wait_all
from kimivl_rl.infra.weight_sync import ObjectStoreTransport
from kimivl_rl.rl.sampler import PromptSampler
from kimivl_rl.system.actors import RLActors, generate, score
from kimivl_rl.system.controller import CollectAhead, Lockstep
from test_rl_ray import rl_cfg

pytestmark = pytest.mark.slow


# ----------------------------------------------------------------------------- hangs

def test_a_hung_call_becomes_an_error_naming_the_actor_and_step(ray_cluster):
    import ray

    class _Sleeper:  # defined here so Ray ships it by value to the worker
        def nap(self, seconds: float) -> float:
            time.sleep(seconds)
            return seconds

    sleepers = [ray.remote(_Sleeper).options(num_cpus=0).remote() for _ in range(2)]
    started = time.monotonic()
    with pytest.raises(RemoteTimeout, match=r"sleeper-1 did not finish 'nap' within 1s"):
        wait_all([sleepers[0].nap.remote(0.0), sleepers[1].nap.remote(60.0)], "sleeper", "nap", 1.0)
    assert time.monotonic() - started < 30  # it did not wait for the 60 s call
    for s in sleepers:
        ray.kill(s)


def test_a_sync_to_some_rollout_workers_names_them_by_their_index(ray_cluster):
    """A recovery push goes to the restarted worker alone: an error names it, not ``rollout-0``."""
    import ray

    class _Endpoint:  # a learner rank's and a rollout worker's side of an object-store push
        def state_for_sync(self) -> dict:
            return {}

        def load_weights(self, state: dict, version: int) -> None:
            time.sleep(60)

    learner, stuck = (ray.remote(_Endpoint).options(num_cpus=0).remote() for _ in range(2))
    with pytest.raises(RemoteTimeout, match=r"^rollout-2 did not finish 'load weights version 1'"):
        ObjectStoreTransport(1.0).push([learner], {"rollout-2": stuck}, 1)
    for actor in (learner, stuck):
        ray.kill(actor)


def test_actor_start_past_its_timeout_fails_naming_the_actor_and_frees_it(tmp_path, tiny_model_dir,
                                                                         small_data_dir, ray_cluster):
    import ray

    cfg = rl_cfg(tmp_path, tiny_model_dir, small_data_dir, "cluster.call_timeout_s=0.01")
    with pytest.raises(RemoteTimeout, match=r"learner-0 did not finish 'start'"):
        RLActors.start(cfg, cfg.model.path)
    deadline = time.monotonic() + 30
    while "learner-0" in ray.util.list_named_actors() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "learner-0" not in ray.util.list_named_actors()


# ----------------------------------------------------------------------------- deaths

def _pid(actor) -> int:
    import ray

    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))


def _busy_pid(actor) -> int:
    """The pid of an actor that may be in the middle of a call, from Ray's state API."""
    import ray
    from ray.util.state import get_actor

    # The address, because other local Ray clusters would make the default ambiguous.
    return get_actor(actor._actor_id.hex(), address=ray.get_runtime_context().gcs_address).pid


def _kill_after_first_submit(monkeypatch, step: str, actor_of, caller=actors_module) -> list[int]:
    """Make the first ``call_all`` of ``step`` (in module ``caller``) SIGKILL the actor right after
    submitting to it, while its call is in flight; return the list that receives the killed pid.
    With ``caller=remote`` this covers ``wait_all`` steps too, whose calls were submitted before."""
    real_call_all, killed = caller.call_all, []

    def call_all(submits, names, step_name, *args, **kwargs):
        if step_name == step and not killed:
            first = submits[0]

            def submit_then_kill():
                if killed:
                    return first()
                pid = _busy_pid(actor_of())
                ref = first()
                killed.append(pid)
                os.kill(pid, signal.SIGKILL)
                return ref
            submits = [submit_then_kill, *submits[1:]]
        return real_call_all(submits, names, step_name, *args, **kwargs)

    monkeypatch.setattr(caller, "call_all", call_all)
    return killed


@pytest.fixture(scope="module")
def rl_setup(tmp_path_factory, tiny_model_dir, small_data_dir, ray_cluster):
    from transformers import AutoProcessor

    cfg = rl_cfg(tmp_path_factory.mktemp("fault"), tiny_model_dir, small_data_dir,
                 "rollout.max_new_tokens=24")
    actors = RLActors.start(cfg, cfg.model.path)
    yield cfg, actors, AutoProcessor.from_pretrained(tiny_model_dir), RowLoader.prompts(cfg.data, cfg.rl.train_file)
    actors.stop()


def test_killed_rollout_worker_is_restarted_resynced_and_its_prompts_redone(rl_setup, monkeypatch):
    cfg, actors, processor, prompts = rl_setup
    loop = Lockstep(actors, cfg, processor, prompts, PromptSampler(len(prompts), "uniform", seed=0))
    loop.run_iteration(0)  # engines: version 1
    synced = []
    real_sync = actors.sync_weights
    monkeypatch.setattr(actors, "sync_weights",
                        lambda version, indices=None: synced.append((version, indices)) or
                        real_sync(version, indices))
    killed = _kill_after_first_submit(monkeypatch, "generate", lambda: actors.rollouts[0])

    metrics = loop.run_iteration(1)

    assert killed and _pid(actors.rollouts[0]) != killed[0]  # a new process
    assert metrics["restarts_rollout"] == 1 and metrics["restarts_reward"] == 0
    # The restarted engine got the current policy (version 1) before redoing its prompts, then
    # the iteration's own sync (version 2) went to every engine.
    assert synced == [(1, [0]), (2, None)]
    # Every sampled prompt was generated and scored: k samples each, nothing lost or doubled.
    assert len(metrics["sampled_prompts"]) == cfg.rl.prompts_per_iteration
    assert metrics["reward_mean"] == metrics["reward_mean"]


def test_rollout_worker_killed_while_collecting_ahead_is_restarted_and_its_prompts_redone(
        rl_setup, monkeypatch):
    """rl.max_staleness=1: the kill hits the collection of iteration 2 while update 1 runs."""
    cfg, actors, processor, prompts = rl_setup
    loop = CollectAhead(actors, cfg, processor, prompts, PromptSampler(len(prompts), "uniform", seed=0))
    loop.run_iteration(0)  # leaves iteration 1's groups collected ahead
    restarts = actors.restarts["rollout"]
    killed = _kill_after_first_submit(monkeypatch, "generate", lambda: actors.rollouts[0])

    metrics = loop.run_iteration(1)

    assert killed and _pid(actors.rollouts[0]) != killed[0]
    assert actors.restarts["rollout"] == restarts + 1 and metrics["learner_responses"] > 0
    assert len(loop.ahead.chosen) == cfg.rl.prompts_per_iteration  # nothing lost or doubled
    assert len(loop.ahead.trajectories) == cfg.rl.prompts_per_iteration * cfg.rl.samples_per_prompt


def test_killed_reward_service_is_restarted_and_scores_the_batch_once(rl_setup, monkeypatch):
    cfg, actors, processor, prompts = rl_setup
    examples = prompts[:3]
    samples = generate(actors, cfg, generation_requests(examples, processor), 2, 1.0, seed=5)
    killed = _kill_after_first_submit(monkeypatch, "score", lambda: actors.reward.workers[0],
                                      caller=reward_pool)
    before = actors.restarts["reward"]

    scores = score(actors, cfg, examples, samples)

    assert killed and actors.restarts["reward"] == before + 1
    assert len(scores) == 6 and all(0.0 <= s.score <= 1.0 for s in scores)


def test_reward_worker_killed_while_collecting_ahead_is_restarted_and_scores_once(rl_setup,
                                                                                 monkeypatch):
    """rl.max_staleness=1: the kill hits the scoring of iteration 2's groups while update 1 runs."""
    cfg, actors, processor, prompts = rl_setup
    loop = CollectAhead(actors, cfg, processor, prompts, PromptSampler(len(prompts), "uniform", seed=0))
    loop.run_iteration(0)
    restarts = actors.restarts["reward"]
    killed = _kill_after_first_submit(monkeypatch, "score", lambda: actors.reward.workers[0],
                                      caller=reward_pool)

    metrics = loop.run_iteration(1)

    assert killed and actors.restarts["reward"] == restarts + 1 and metrics["learner_responses"] > 0
    scored = loop.ahead.trajectories
    assert len(scored) == cfg.rl.prompts_per_iteration * cfg.rl.samples_per_prompt
    assert all(t.reward_reason for t in scored)  # every sample has its score's reason


def test_generation_is_a_function_of_its_seed_not_of_earlier_calls(rl_setup):
    """What makes a resumed run sample what the uninterrupted one did."""
    cfg, actors, processor, prompts = rl_setup
    requests = generation_requests(prompts[:2], processor)
    first = generate(actors, cfg, requests, 2, 1.0, seed=11)
    generate(actors, cfg, requests, 2, 1.0, seed=12)  # moves the engine's generator on
    again = generate(actors, cfg, requests, 2, 1.0, seed=11)
    tokens = lambda groups: [[s.token_ids for s in g] for g in groups]
    assert tokens(first) == tokens(again)

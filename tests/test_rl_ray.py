"""The RL system on a local Ray cluster: real vLLM rollout workers, the reward service and a
DeepSpeed learner group on CPU."""
from __future__ import annotations

import json

import pytest
import torch

from kimivl_rl.config import load_config
from kimivl_rl.system.actors import RLActors, generate
from kimivl_rl.system.checkpoints import latest_checkpoint
from kimivl_rl.system.controller import run_rl
from kimivl_rl.data.rows import RowLoader
from kimivl_rl.evaluation import by_difficulty, difficulties_in_band, generation_requests
from kimivl_rl.infra.layout import OutputLayout
from kimivl_rl.prepare import with_absolute_paths
from kimivl_rl.rl.experience import trajectories_from_samples
from kimivl_rl.infra.weight_sync import ObjectStoreTransport

pytestmark = pytest.mark.slow


def rl_cfg(tmp_path, model_dir, data_dir, *overrides):
    # The random-init model earns no reward, so every group is uniform: the learner takes them all
    # anyway, and every iteration really updates and syncs; dynamic sampling would only repeat.
    return with_absolute_paths(load_config("configs/tiny.yaml", [
        f"model.path={model_dir}", "model.init_if_missing=false", f"data.dir={data_dir}",
        "data.build_if_missing=false", f"output.dir={tmp_path / 'out'}",
        "rl.prompts_per_iteration=4", "rl.samples_per_prompt=4", "rollout.max_new_tokens=12",
        "rl.eval_prompts=4", "rl.micro_batch_tokens=256", "rl.lr=1.0e-3",
        "rl.drop_zero_advantage_groups=false", "rl.dynamic_sampling_rounds=0", *overrides]))


def learn_from_alternate_rewards(actors, cfg, prompts, requests) -> tuple[list, dict]:
    """One learner update on 3 samples per prompt, every other one rewarded; the trajectories
    and the learner's metrics."""
    import ray

    samples = generate(actors, cfg, requests, 3, 1.0, seed=0)
    trajectories = trajectories_from_samples(list(range(len(prompts))), [p.images for p in prompts], samples)
    for i, t in enumerate(trajectories):
        t.reward = float(i % 2)
    return trajectories, ray.get(actors.learners[0].learn.remote(trajectories))


SYNCED = 2e-3  # nats per token between engine and learner on one set of float32 weights


def rollout_learner_gap(actors, cfg, prompts, requests) -> float:
    """Same prompts, fresh samples from the engines, scored by both sides: the largest
    per-token log-probability difference."""
    import ray

    fresh = trajectories_from_samples(list(range(len(prompts))), [p.images for p in prompts],
                                      generate(actors, cfg, requests, 2, 1.0, seed=1))
    learner = ray.get(actors.learners[0].sequence_logprobs.remote(fresh))
    return max(float((torch.tensor(t.rollout_logprobs) - torch.tensor(lp)).abs().max())
               for t, lp in zip(fresh, learner))


def assert_rollouts_score_like_the_learner(actors, cfg, prompts, requests) -> None:
    assert rollout_learner_gap(actors, cfg, prompts, requests) <= SYNCED


def test_weight_sync_makes_rollout_logprobs_match_the_learner(tmp_path, tiny_model_dir, small_data_dir,
                                                              ray_cluster):
    from transformers import AutoProcessor

    cfg = rl_cfg(tmp_path, tiny_model_dir, small_data_dir, "rl.truncated_is_cap=2.0",
                 "cluster.malloc=tcmalloc")
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    prompts = RowLoader.prompts(cfg.data, cfg.rl.train_file)[:2]  # includes an image prompt or a text one
    actors = RLActors.start(cfg, cfg.model.path)
    try:
        import ray

        mapped_files = lambda _: open("/proc/self/maps").read()  # noqa: E731 (a lambda travels by value)
        for actor in [*actors.learners, *actors.rollouts]:  # cluster.malloc reached both roles
            assert "libtcmalloc" in ray.get(actor.__ray_call__.remote(mapped_files))
        requests = generation_requests(prompts, processor)
        trajectories, fresh = learn_from_alternate_rewards(actors, cfg, prompts, requests)
        assert fresh["learner_tokens"] == sum(len(t.prompt_token_ids) + len(t.response_token_ids)
                                              for t in trajectories)
        transport = ObjectStoreTransport(cfg.cluster.call_timeout_s)
        transport.push(actors.learners, {"rollout-0": actors.rollouts[0]}, 1)
        assert_rollouts_score_like_the_learner(actors, cfg, prompts, requests)
        # The update moved the policy the right way: rewarded responses gained probability
        # relative to unrewarded ones of the same prompts.
        before = [sum(t.rollout_logprobs) for t in trajectories]
        after = [sum(lp) for lp in ray.get(actors.learners[0].sequence_logprobs.remote(trajectories))]
        gain = {r: [a - b for a, b, t in zip(after, before, trajectories) if t.reward == r] for r in (0.0, 1.0)}
        assert sum(gain[1.0]) / len(gain[1.0]) > sum(gain[0.0]) / len(gain[0.0]) + 1e-3
        # The truncated importance weight is 1 for fresh samples (the sampler is the learner) and
        # moves, within its cap, for the same samples one update later.
        stale = ray.get(actors.learners[0].learn.remote(trajectories))
        print(f"importance weight: fresh {fresh['is_weight_mean']:.6f}, stale {stale['is_weight_mean']:.6f}")
        assert fresh["is_weight_mean"] == pytest.approx(1.0, abs=1e-3)
        assert abs(stale["is_weight_mean"] - 1.0) > 1e-4 and stale["is_weight_mean"] <= 2.0, stale
    finally:
        actors.stop()


def test_a_colocated_engine_takes_each_update_through_the_shared_ring(tmp_path, tiny_model_dir,
                                                                     small_data_dir, ray_cluster):
    """cluster.colocate with the ipc transport on CPU: the ring lives in shared memory, buckets
    small enough that the two slots are reused within one sync, and a second sync reuses the
    ring. Before each sync the engine scores unlike the learner, after it alike. The learner
    recomputes activations in backward, as a colocated learner of a real shape does."""
    from transformers import AutoProcessor

    cfg = rl_cfg(tmp_path, tiny_model_dir, small_data_dir, "cluster.colocate=true",
                 "cluster.weight_transport=ipc", f"cluster.weight_bucket_bytes={256 * 1024}",
                 "rl.gradient_checkpointing=true")
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    prompts = RowLoader.prompts(cfg.data, cfg.rl.train_file)[:2]
    requests = generation_requests(prompts, processor)
    actors = RLActors.start(cfg, cfg.model.path)
    try:
        assert actors.placement is not None
        for version in (1, 2):
            learn_from_alternate_rewards(actors, cfg, prompts, requests)
            assert rollout_learner_gap(actors, cfg, prompts, requests) > SYNCED  # the update shows
            assert actors.sleep_engines() == 0.0  # vLLM's sleep mode needs a GPU
            assert actors.sync_weights(version).version == version
            assert_rollouts_score_like_the_learner(actors, cfg, prompts, requests)
    finally:
        actors.stop()


def assert_final_model_is_the_last_checkpoint(cfg, tmp_path) -> None:
    """The last checkpoint, exported for `kimivl-rl eval`, is the final model exactly."""
    from safetensors.torch import load_file

    from kimivl_rl.models.loading import export_rl_checkpoint

    exported = load_file(export_rl_checkpoint(latest_checkpoint(cfg), tmp_path / "exported")
                         / "model.safetensors")
    final = load_file(OutputLayout.of(cfg).model("rl") / "model.safetensors")
    assert exported.keys() == final.keys() and all(torch.equal(exported[k], final[k]) for k in final)


def test_two_iterations_checkpoint_and_resume(tmp_path, tiny_model_dir, small_data_dir, ray_cluster):
    # Dynamic sampling on: no group of the random model has differing rewards, so every
    # iteration rolls out a second round of prompts (the bound) and learns on both.
    warm = ["rl.lr_warmup_steps=4",  # 2 updates an iteration: iterations start at 1/4, 3/4, 1 of rl.lr
            "rl.kl_coef=0.1"]  # the KL to the starting policy, whose copy a resume must reload
    cfg = rl_cfg(tmp_path, tiny_model_dir, small_data_dir, "rl.iterations=2", "rl.checkpoint_every=1",
                 "rl.eval_every=2", "rl.length_penalty_start_iteration=1",
                 "rl.dynamic_sampling_rounds=1", *warm)
    summary = run_rl(cfg, cfg.model.path)
    assert summary["iterations"] == 2 and summary["eval_start"]["eval_reward"] is not None
    assert summary["iterations_without_update"] == 0
    records = [json.loads(line) for line in OutputLayout.of(cfg).metrics("rl").read_text().splitlines()]
    # The tier is what the rule picks from iteration 0's accuracy per level, and it stays.
    reports = [r["eval_report"] for r in records if "eval_report" in r]
    accuracy = {level: s["greedy"] for level, s in by_difficulty(reports[0]["slices"]).items()}
    assert summary["tier"]["difficulties"] == difficulties_in_band(accuracy, 0.2, 0.8)
    assert reports[-1]["tier"] == summary["tier"] and summary["eval"] == reports[-1]
    assert summary["eval_end"]["eval_tier_n"] == reports[-1]["slices"]["tier"]["n"]
    trained = [r for r in records if "reward_mean" in r]
    assert [r["step"] for r in trained] == [1, 2]
    assert [r["length_penalty_weight"] for r in trained] == [0.0, cfg.rl.length_penalty_weight]
    # Each iteration's rollouts came from the weights the learner held: the sync arrived.
    assert all(r["rollout_logprob_diff_abs_mean"] < 2e-3 for r in trained)
    for key in ("pass_rate", "response_length_mean", "logprob_diff_abs_mean", "time_generate_s",
                "time_reward_s", "time_learn_s", "time_sync_s", "generated_tokens_per_s",
                "informative_group_fraction"):
        assert all(key in r for r in trained), key
    assert [r["sampling_rounds"] for r in trained] == [2, 2]
    assert all(sum(r["reward_reasons"].values()) == 32 for r in trained)
    assert [len(r["sampled_prompts"]) for r in trained] == [8, 8]
    assert [r["learner_responses"] for r in trained] == [32, 32]  # 2 x 4 prompts x 4 samples
    assert [r["lr"] for r in trained] == pytest.approx([0.25e-3, 0.75e-3], rel=1e-9)
    # Iteration 1's rewards are all equal (no length term yet): no step moved the policy, so
    # iteration 2 starts where the reference is, to the bit.
    assert [r["kl_ref"] for r in trained] == [0.0, 0.0]
    assert latest_checkpoint(cfg).name == "iter_000002"
    assert (OutputLayout.of(cfg).model("rl") / "model.safetensors").is_file()
    assert_final_model_is_the_last_checkpoint(cfg, tmp_path)

    longer = rl_cfg(tmp_path, tiny_model_dir, small_data_dir, "rl.iterations=3", "rl.checkpoint_every=1",
                    "rl.eval_every=2", "rl.length_penalty_start_iteration=1",
                    "rl.dynamic_sampling_rounds=1", *warm)
    resumed = run_rl(longer, longer.model.path)
    assert resumed["iterations"] == 3
    records = [json.loads(line) for line in OutputLayout.of(cfg).metrics("rl").read_text().splitlines()]
    assert [r["step"] for r in records if "reward_mean" in r] == [1, 2, 3]  # not restarted
    # the warm-up goes on where it stopped: the scheduler's position is in the checkpoint
    assert records[-1]["lr"] == pytest.approx(1e-3, rel=1e-9)
    # iteration 2's length term moved the policy; a reference reloaded from the checkpoint would
    # give 0 here
    assert records[-1]["kl_ref"] > 0.01
    state = json.loads((latest_checkpoint(cfg) / "controller_state.json").read_text())
    assert state["iteration"] == 3


def test_a_learner_group_of_two_zero3_ranks_trains_syncs_and_exports(tmp_path, tiny_model_dir,
                                                                     small_data_dir, ray_cluster):
    """Under ZeRO-3 each rank holds a shard: gathering the weights for a sync, a checkpoint or
    the final export is a collective every rank must join (an export asked of rank 0 alone
    waits for the others until call_timeout_s)."""
    cfg = rl_cfg(tmp_path, tiny_model_dir, small_data_dir, "rl.iterations=2", "rl.eval_every=2",
                 "cluster.num_learners=2", "rl.zero_stage=3", "cluster.learner_cpus=0.5",
                 "cluster.call_timeout_s=300")
    assert run_rl(cfg, cfg.model.path)["iterations"] == 2
    records = [json.loads(line) for line in OutputLayout.of(cfg).metrics("rl").read_text().splitlines()]
    trained = [r for r in records if "reward_mean" in r]
    assert [r["step"] for r in trained] == [1, 2]
    assert all(r["rollout_logprob_diff_abs_mean"] < 2e-3 for r in trained)
    assert_final_model_is_the_last_checkpoint(cfg, tmp_path)


def test_label_difficulty_writes_pass_rates(tmp_path, tiny_model_dir, small_data_dir, ray_cluster):
    import shutil

    from kimivl_rl.data.rows import RowLoader
    from kimivl_rl.system.difficulty import label_difficulty

    data = tmp_path / "data"
    shutil.copytree(small_data_dir / "rl", data)
    rows = (data / "train.jsonl").read_text().splitlines()[:6]
    (data / "few.jsonl").write_text("\n".join(rows) + "\n")
    cfg = rl_cfg(tmp_path, tiny_model_dir, small_data_dir, "sampler.label_samples=3")
    stats = label_difficulty(cfg, cfg.model.path, data / "few.jsonl", data / "few.labelled.jsonl")
    assert stats["prompts"] == 6 and stats["samples_per_prompt"] == 3
    labelled = RowLoader(data / "few.labelled.jsonl", require_answer=True).load_all()
    assert len(labelled) == 6
    assert all(r.pass_rate in (0.0, 1 / 3, 2 / 3, 1.0) for r in labelled)
    with pytest.raises(ValueError, match="next to"):
        label_difficulty(cfg, cfg.model.path, data / "few.jsonl", tmp_path / "elsewhere.jsonl")


def test_collecting_ahead_trains_one_version_behind(tmp_path, tiny_model_dir, small_data_dir,
                                                    ray_cluster):
    """rl.max_staleness=1: iteration t+1's groups are sampled with version t while update t runs,
    and saved with the checkpoint written after it; the last iteration collects none ahead."""
    cfg = rl_cfg(tmp_path, tiny_model_dir, small_data_dir, "rl.iterations=3", "rl.checkpoint_every=1",
                 "rl.eval_every=3", "rl.max_staleness=1")
    run_rl(cfg, cfg.model.path)
    records = [json.loads(line) for line in OutputLayout.of(cfg).metrics("rl").read_text().splitlines()]
    trained = [r for r in records if "reward_mean" in r]
    assert [r["staleness_max"] for r in trained] == [0, 1, 1]
    assert [r["staleness_mean"] for r in trained] == [0.0, 1.0, 1.0]
    assert [r["staleness_counts"] for r in trained] == [{"0": 16}, {"1": 16}, {"1": 16}]
    assert [r["learner_responses"] for r in trained] == [16, 16, 16]
    assert all(r["learner_idle_s"] >= 0 and r["rollout_idle_s"] >= 0 for r in trained)
    checkpoints = OutputLayout.of(cfg).rl_checkpoints
    ahead = json.loads((checkpoints / "iter_000002" / "groups_ahead.json").read_text())
    assert {t["policy_version"] for t in ahead["trajectories"]} == {1}
    assert ahead["chosen"] == trained[2]["sampled_prompts"]
    assert not (checkpoints / "iter_000003" / "groups_ahead.json").exists()


def test_partial_rollouts_continue_long_responses_in_the_next_iteration_and_resume(
        tmp_path, tiny_model_dir, small_data_dir, ray_cluster):
    """rollout.token_budget=6 of max_new_tokens=12: every response of the random-init model runs
    to the limit, so each group waits one iteration, is continued under newer weights and trains
    there, two versions behind; a checkpoint keeps the waiting responses and a resumed run
    continues them."""
    partial = ["rl.checkpoint_every=1", "rl.eval_every=5", "rl.max_staleness=2",
               "rollout.token_budget=6"]
    cfg = rl_cfg(tmp_path, tiny_model_dir, small_data_dir, "rl.iterations=3", *partial)
    run_rl(cfg, cfg.model.path)
    layout = OutputLayout.of(cfg)
    trained = [json.loads(line) for line in layout.metrics("rl").read_text().splitlines()]
    trained = [r for r in trained if "reward_mean" in r]
    # Iteration 0 only fills the pipeline: its groups (and those collected ahead for 1) wait.
    assert [r["learner_responses"] for r in trained] == [0, 16, 16]
    assert [r["partial_groups"] for r in trained] == [0, 4, 4]
    # at most 6 tokens from each of 4 x 4 responses (one may have stopped early)
    assert trained[0]["carried_tokens"] == 0 and all(0 < r["carried_tokens"] <= 96 for r in trained[1:])
    assert [r["staleness_counts"] for r in trained] == [{}, {"1": 16}, {"2": 16}]
    assert [r["unfinished_groups"] for r in trained] == [4, 4, 4]
    assert all(r["stale_groups"] == 0 and r["response_length_max"] <= 12 for r in trained)

    saved = json.loads((layout.rl_checkpoint(3) / "partial_responses.json").read_text())
    assert len(saved["groups"]) == 4
    for group in saved["groups"]:
        assert group["version"] == 1 and "budget" in {s["finish_reason"] for s in group["samples"]}
        for s in group["samples"]:
            assert len(s["logprobs"]) == len(s["token_ids"]) <= 6
            assert (len(s["token_ids"]) == 6) == (s["finish_reason"] == "budget")

    longer = rl_cfg(tmp_path, tiny_model_dir, small_data_dir, "rl.iterations=4", *partial)
    run_rl(longer, longer.model.path)
    last = [json.loads(line) for line in layout.metrics("rl").read_text().splitlines()][-1]
    assert last["step"] == 4 and last["partial_groups"] == 4 and last["learner_responses"] == 16
    # Resumed at iteration 3: the waiting groups were sampled by version 1 (collected for 2).
    assert last["staleness_counts"] == {"2": 16}


def test_partial_responses_older_than_max_staleness_are_sampled_again_not_trained(
        tmp_path, tiny_model_dir, small_data_dir, ray_cluster):
    """rollout.token_budget=4 of 12: a response needs 3 segments. Groups collected for iteration
    1 (version 0) would be 3 versions old at iteration 3, past rl.max_staleness=2: they are sampled
    again from their prompts; only the groups collected for iteration 0 train (at iteration 2)."""
    cfg = rl_cfg(tmp_path, tiny_model_dir, small_data_dir, "rl.iterations=4", "rl.checkpoint_every=4",
                 "rl.eval_every=4", "rl.max_staleness=2", "rollout.token_budget=4")
    run_rl(cfg, cfg.model.path)
    trained = [json.loads(line) for line in OutputLayout.of(cfg).metrics("rl").read_text().splitlines()]
    trained = [r for r in trained if "reward_mean" in r]
    assert [r["learner_responses"] for r in trained] == [0, 0, 16, 0]
    assert [r["staleness_counts"] for r in trained] == [{}, {}, {"2": 16}, {}]
    assert [r["stale_groups"] for r in trained] == [0, 0, 0, 4]
    # waiting after each iteration's collection; at the last, the 4 stale prompts rolled out again
    assert [r["unfinished_groups"] for r in trained] == [8, 8, 12, 12]

"""RL raises held-out reward: a weak joint-SFT checkpoint on the easiest built-in tasks, then a
short RL run with the default loss (k1.5 policy mirror descent), all on the real system."""
from __future__ import annotations

import pytest

from kimivl_rl.config import load_config
from kimivl_rl.controller import run_rl
from kimivl_rl.data.build import BuildSpec, build_dataset
from kimivl_rl.prepare import with_absolute_paths
from sft.trainer import stage_output_model, train_stage

pytestmark = pytest.mark.slow
EASY = BuildSpec(seed=3, max_difficulty=1, joint_sft_examples=600, long_cot_examples=8, rl_prompts=200,
                 eval_examples=64)


def test_rl_raises_heldout_reward_from_a_weak_checkpoint(tmp_path, tiny_model_dir, ray_cluster):
    data = build_dataset(EASY, tmp_path / "easy", progress=False)
    cfg = with_absolute_paths(load_config("configs/tiny.yaml", [
        f"model.path={tiny_model_dir}", "model.init_if_missing=false", f"data.dir={data}",
        "data.build_if_missing=false", f"output.dir={tmp_path / 'out'}", "sft.cpus_per_worker=1",
        "sft.joint.phases=[{max_seq_len: 256, epochs: 1, lr_peak: 5.0e-4, lr_final: 1.0e-4, warmup_steps: 3}]",
        "rl.iterations=12", "rl.prompts_per_iteration=16", "rl.samples_per_prompt=8",
        "rollout.max_new_tokens=12", "rl.lr=5.0e-5", "rl.eval_every=6", "rl.eval_prompts=64",
        "rl.checkpoint_every=12", "sampler.mode=uniform", "rl.length_penalty_start_iteration=6"]))
    train_stage(cfg, "joint", cfg.model.path)
    summary = run_rl(cfg, str(stage_output_model(cfg, "joint")))
    print("held-out reward", summary["eval_reward_start"], "->", summary["eval_reward_end"])
    assert summary["eval_reward_end"] >= summary["eval_reward_start"] + 0.1

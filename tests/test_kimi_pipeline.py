"""The Kimi families (K2.5 and Kimi-VL) through all three stages from the command line, as a user runs
`kimivl-rl run configs/tiny_kimi.yaml`: the tiny Kimi model is built, joint and long-CoT SFT
train it under DeepSpeed, vLLM samples it for evaluation and RL, the learner updates it and its
weights reach the engine (the engine's log-probabilities then match the learner's)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHORT_PHASE = "[{max_seq_len: 256, epochs: 1, lr_peak: 1.0e-3, lr_final: 1.0e-4, warmup_steps: 2}]"


@pytest.mark.slow
@pytest.mark.parametrize("family", ["kimi_k25", "kimi_vl"])
def test_tiny_kimi_runs_joint_sft_long_cot_sft_and_rl(tmp_path, family):
    run = [sys.executable, "-m", "kimivl_rl.cli", "run", "configs/tiny_kimi.yaml", f"model.family={family}",
           f"model.path={tmp_path}/model", f"data.dir={tmp_path}/data", f"output.dir={tmp_path}/out",
           "data.joint_sft_examples=60", "data.long_cot_examples=30", "data.rl_prompts=40",
           "data.eval_examples=20", f"sft.joint.phases={SHORT_PHASE}",
           f"sft.long_cot.phases={SHORT_PHASE}",
           "sft.eval_examples=4", "sft.eval_max_new_tokens=16",
           # every group informative, so each iteration updates the policy and syncs it
           "reward.function=reward_plugins:mentions_a_digit", "rl.iterations=3",
           "rl.prompts_per_iteration=2", "rl.samples_per_prompt=4", "rl.eval_every=3",
           "rl.eval_prompts=4", "rollout.max_new_tokens=16", "rollout.temperature=1.0"]
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}")
    done = subprocess.run(run, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-5000:]
    assert "RL over 3 iterations, held-out greedy accuracy" in done.stdout
    out = tmp_path / "out"
    assert json.loads((tmp_path / "model" / "config.json").read_text())["model_type"] == family
    for stage in ("sft_joint", "sft_long_cot", "rl"):
        assert (out / stage / "model" / "model.safetensors").is_file(), stage
    rows = [json.loads(line) for line in (out / "rl" / "metrics.jsonl").read_text().splitlines()]
    updates = [r for r in rows if "learner_responses" in r]
    assert len(updates) == 3 and all(r["learner_responses"] > 0 for r in updates)
    # Iterations 2 and 3 sample with the weights the learner sent after the one before.
    assert all(r["rollout_logprob_diff_abs_mean"] < 1e-3 for r in updates[1:])

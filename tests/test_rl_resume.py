"""The whole run dies mid-RL (SIGKILL of the driver and the local Ray cluster it started): the
rerun resumes from the last checkpoint and ends where an uninterrupted run ends.

In its own module so that no other module's actors (a vLLM engine holds several GB on CPU) are
alive while its two runs start their own clusters."""
from __future__ import annotations

import os
import signal
import time

import pytest

pytestmark = pytest.mark.slow


def _rl_command(model_dir, data_dir, out, staleness: int = 0) -> list[str]:
    import sys

    return [sys.executable, "-m", "kimivl_rl.cli", "rl", "configs/tiny.yaml", "--model", str(model_dir),
            f"model.path={model_dir}", "model.init_if_missing=false", f"data.dir={data_dir}",
            "data.build_if_missing=false", f"output.dir={out}", "cluster.dashboard=false",
            "rl.iterations=3", "rl.checkpoint_every=1", "rl.eval_every=3", "rl.eval_prompts=4",
            "rl.prompts_per_iteration=4", "rl.samples_per_prompt=4", "rl.micro_batch_tokens=256",
            "rl.lr=1.0e-3", "rl.length_penalty_start_iteration=1", "rollout.max_new_tokens=16",
            f"rl.max_staleness={staleness}",
            "rl.drop_zero_advantage_groups=false"]  # the random model's groups are all uniform


@pytest.mark.parametrize("staleness", [0, 1])
def test_driver_killed_mid_run_resumes_like_an_uninterrupted_run(tmp_path, tiny_model_dir,
                                                                  small_data_dir, staleness):
    """SIGKILL the driver (and the local Ray cluster it started) during iteration 3, rerun the
    same command, and compare with a run that was never interrupted. With rl.max_staleness=1
    the rerun trains on the groups the checkpoint collected ahead."""
    import subprocess

    from safetensors.torch import load_file

    from kimivl_rl.infra.metrics import read_jsonl

    straight = subprocess.run(_rl_command(tiny_model_dir, small_data_dir, tmp_path / "straight", staleness),
                              capture_output=True, text=True, timeout=900)
    assert straight.returncode == 0, straight.stderr[-3000:]

    out = tmp_path / "killed"
    command = _rl_command(tiny_model_dir, small_data_dir, out, staleness)
    first = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    checkpoint, deadline = out / "rl" / "checkpoints" / "iter_000002", time.time() + 600
    while not checkpoint.is_dir() and time.time() < deadline and first.poll() is None:
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert checkpoint.is_dir() and not (out / "rl" / "summary.json").exists()
    time.sleep(10)  # Ray workers notice their raylet is gone and exit
    second = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed RL from" in second.stderr + second.stdout

    a, b = (read_jsonl(d / "rl" / "metrics.jsonl") for d in (tmp_path / "straight", out))
    a_train, b_train = ([r for r in runs if "reward_mean" in r] for runs in (a, b))
    assert [r["step"] for r in b_train] == [1, 2, 3]
    for x, y in zip(a_train, b_train):  # same prompts, same samples, same update
        assert x["sampled_prompts"] == y["sampled_prompts"]
        assert x["reward_mean"] == pytest.approx(y["reward_mean"], abs=1e-6)
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4, abs=1e-6)
        assert x["staleness_mean"] == y["staleness_mean"]
    final_a, final_b = (load_file(d / "rl" / "model" / "model.safetensors")
                        for d in (tmp_path / "straight", out))
    for name, tensor in final_a.items():
        assert (tensor - final_b[name]).abs().max() <= 1e-5, name

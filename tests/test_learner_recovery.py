"""A learner rank dies mid-run (a real SIGKILL while its update is in flight): the controller
rebuilds the learner group from the newest checkpoint and the run ends with every configured
update; past ``cluster.max_learner_restarts`` the CLI says what died and how to resume.

In its own module: each test runs the whole RL stage, whose actors do not fit beside another
module's on the test cluster's 2 CPUs."""
from __future__ import annotations

import json
import shlex

import pytest

import kimivl_rl.infra.remote as remote
from kimivl_rl.cli import main
from kimivl_rl.infra.checkpoint import load_state
from kimivl_rl.infra.layout import OutputLayout
from kimivl_rl.infra.metrics import read_jsonl
from kimivl_rl.system.checkpoints import latest_checkpoint
from kimivl_rl.system.controller import run_rl
from test_fault_tolerance import _kill_after_first_submit
from test_rl_ray import rl_cfg
from test_rl_resume import _rl_command

pytestmark = pytest.mark.slow


def _kill_learner_during_update(monkeypatch, iteration: int) -> list[int]:
    import ray

    return _kill_after_first_submit(monkeypatch, f"learn (iteration {iteration})",
                                    lambda: ray.get_actor("learner-0"), caller=remote)


@pytest.mark.parametrize("checkpoint_every, restarts_from, checkpointed, staleness", [
    (1, 1, [1, 2, 3], 0),  # from iteration 1's checkpoint
    (2, 0, [2, 3], 0),  # before the first checkpoint: the starting model, the rollout engine reset too
    (1, 1, [1, 2, 3], 1),  # killed while iteration 2's groups are collected: those are dropped,
])                         # and iteration 1 trains on the groups its checkpoint collected ahead
def test_learner_killed_during_an_update_is_restarted_and_the_run_completes(
        checkpoint_every, restarts_from, checkpointed, staleness, tmp_path, tiny_model_dir,
        small_data_dir, ray_cluster, monkeypatch, caplog):
    cfg = rl_cfg(tmp_path, tiny_model_dir, small_data_dir, "rl.iterations=3",
                 f"rl.checkpoint_every={checkpoint_every}", "rl.eval_every=3",
                 f"rl.max_staleness={staleness}")
    killed = _kill_learner_during_update(monkeypatch, 1)

    summary = run_rl(cfg, cfg.model.path)

    assert killed and summary["iterations"] == 3
    assert f"learner group restarted (1 of 2) from iteration {restarts_from}" in caplog.text
    trained = [r for r in read_jsonl(OutputLayout.of(cfg).metrics("rl")) if "reward_mean" in r]
    assert [r["step"] for r in trained] == [1, 2, 3]
    assert [r["restarts_learner"] for r in trained[restarts_from:]] == [1] * (3 - restarts_from)
    assert [r["step"] for r in trained if r.get("time_checkpoint_s", 0) > 0] == checkpointed
    assert [r["staleness_max"] for r in trained] == [0, staleness, staleness]
    final = latest_checkpoint(cfg)
    assert json.loads((final / "controller_state.json").read_text())["iteration"] == 3
    # The final learner state took one update's optimizer steps per iteration: the restarted
    # group resumed from the state before the lost update and redid it, nothing lost or doubled.
    steps = load_state(final / "optimizer_rank0")["scheduler"]["last_epoch"]
    assert steps == 3 * cfg.rl.updates_per_iteration


def test_past_max_learner_restarts_the_cli_says_what_died_and_how_to_resume(
        tmp_path, tiny_model_dir, small_data_dir, ray_cluster, monkeypatch, capsys):
    # `kimivl-rl rl` with 3 iterations and a checkpoint after each; no restart allowed
    args = [*_rl_command(tiny_model_dir, small_data_dir, tmp_path / "out")[3:],
            "cluster.max_learner_restarts=0"]
    killed = _kill_learner_during_update(monkeypatch, 1)

    assert main(args) == 1

    error = capsys.readouterr().err
    checkpoint = tmp_path / "out" / "rl" / "checkpoints" / "iter_000001"
    assert killed and "Traceback" not in error
    assert "learner-0 died during 'learn (iteration 1)'" in error
    assert f"the newest complete checkpoint is {checkpoint}" in error
    assert error.rstrip().endswith(f"To resume: {shlex.join(['kimivl-rl', *args])}")

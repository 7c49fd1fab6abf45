"""Config loading: types, bounds, unknown keys with suggestions, locations, overrides."""
from __future__ import annotations

import glob
import textwrap

import pytest

from kimivl_rl.config import ConfigError, dump_config, load_config
from kimivl_rl.config.schema import Config


def write(tmp_path, text: str):
    path = tmp_path / "cfg.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_defaults_and_yaml_and_overrides_merge(tmp_path):
    path = write(tmp_path, """
        rl:
          samples_per_prompt: 4
          tau: 1e-2
        sft:
          joint:
            phases:
              - {max_seq_len: 64, lr_peak: 1.0e-3, lr_final: 1.0e-4}
        """)
    cfg = load_config(path, ["rl.iterations=7", "sft.joint.phases.0.epochs=2"])
    assert cfg.rl.samples_per_prompt == 4
    assert cfg.rl.tau == pytest.approx(0.01)  # "1e-2" is a string to PyYAML; accepted as float
    assert cfg.rl.iterations == 7
    phase = cfg.sft.joint.phases[0]
    assert (phase.max_seq_len, phase.epochs, phase.lr_peak) == (64, 2.0, 1e-3)
    # Untouched fields of a partly given section keep their defaults.
    assert cfg.sft.joint.train_file == "joint_sft/train.jsonl"
    assert cfg.rollout == Config().rollout


def test_unknown_key_names_file_line_and_suggests(tmp_path):
    path = write(tmp_path, """
        rl:
          iterations: 3
          samples_per_promt: 4
        """)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert f"{path}:4" in message
    assert "rl.samples_per_promt" in message
    assert "did you mean 'samples_per_prompt'" in message


def test_unknown_section_suggests(tmp_path):
    with pytest.raises(ConfigError, match=r"cfg.yaml:2: rollouts: .*did you mean 'rollout'"):
        load_config(write(tmp_path, "\nrollouts: {num_workers: 2}\n"))


@pytest.mark.parametrize("text, key, words", [
    ("rl:\n  iterations: many\n", "rl.iterations", "expected int, got str 'many'"),
    ("rl:\n  iterations: 2.5\n", "rl.iterations", "expected int"),
    ("model:\n  trust_remote_code: 'yes'\n", "model.trust_remote_code", "expected bool"),
    ("rl:\n  loss: grpoo\n", "rl.loss", "did you mean 'grpo'"),
    ("data:\n  bad_rows: ignore\n", "data.bad_rows", "'ignore' is not one of ['error', 'skip']"),
    ("rollout:\n  backend: hf_generate\n", "rollout.backend", "unknown key 'backend'"),
    ("rollout:\n  token_budget: 1024\n", "rollout.token_budget", "leaves nothing to carry over"),
    ("rollout:\n  top_p: 1.5\n", "rollout.top_p", "must be <= 1.0"),
    ("rollout:\n  max_images_per_prompt: most\n", "rollout.max_images_per_prompt",
     "expected int or 'auto', got str 'most'"),
    ("rollout:\n  max_images_per_prompt: 0\n", "rollout.max_images_per_prompt", "must be >= 1"),
    ("eval:\n  tier_difficulties: most\n", "eval.tier_difficulties", "expected list or 'auto'"),
    ("eval:\n  tier_min_accuracy: 0.9\n", "eval.tier_min_accuracy", "above eval.tier_max_accuracy 0.8"),
    ("eval:\n  tier_max_accuracy: 1.5\n", "eval.tier_max_accuracy", "must be <= 1.0"),
    ("rl:\n  samples_per_prompt: 0\n", "rl.samples_per_prompt", "must be >= 1"),
    ("cluster:\n  max_learner_restarts: -1\n", "cluster.max_learner_restarts", "must be >= 0"),
    ("sft:\n  joint:\n    phases: {max_seq_len: 64}\n", "sft.joint.phases", "expected a list"),
    ("rl: 3\n", "rl", "expected a mapping"),
    ("cluster:\n  rollout_resources: [rollout_node]\n", "cluster.rollout_resources", "expected a mapping"),
    ("cluster:\n  rollout_resources: {rollout_node: 0}\n", "cluster.rollout_resources.rollout_node",
     "must be > 0.0"),
    ("cluster:\n  learner_resources: {CPU: 1}\n", "cluster.learner_resources", "set by cluster.learner_cpus"),
])
def test_wrong_types_and_ranges_are_located(tmp_path, text, key, words):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    message = str(err.value)
    assert f"{key}:" in message and words in message
    assert "cfg.yaml:" in message


def test_a_key_of_a_number_or_auto_takes_either(tmp_path):
    assert load_config(write(tmp_path, "rollout:\n  max_images_per_prompt: 3\n")).rollout \
        .max_images_per_prompt == 3
    assert load_config(None, ["rollout.max_images_per_prompt=auto"]).rollout \
        .max_images_per_prompt == "auto"


def test_cross_field_rule(tmp_path):
    path = write(tmp_path, "sft:\n  long_cot:\n    phases:\n      - {lr_peak: 1.0e-5, lr_final: 1.0e-4}\n")
    with pytest.raises(ConfigError, match="sft.long_cot.phases.0.lr_final: .* above lr_peak"):
        load_config(path)


@pytest.mark.parametrize("overrides, message", [
    (["sft.long_cot.replay_examples=10"], "sft.long_cot.replay_examples: replays nothing: set "
                                          "sft.long_cot.replay_file"),
    (["sft.joint.replay_system_prompt=Answer."], "sft.joint.replay_system_prompt: replays nothing"),
    (["sft.long_cot.unsolved_fraction=0.1"], "sft.long_cot.unsolved_fraction: applies only with "
                                             "sft.long_cot.keep_solved: true"),
])
def test_replay_and_keep_solved_settings_that_would_do_nothing_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)
    both = load_config(None, ["sft.long_cot.replay_file=joint_sft/train.jsonl",
                              "sft.long_cot.replay_examples=10", "sft.long_cot.keep_solved=true",
                              "sft.long_cot.unsolved_fraction=0.1"])
    assert both.sft.long_cot.replay_examples == 10 and both.sft.long_cot.unsolved_fraction == 0.1


@pytest.mark.parametrize("overrides, words", [
    (["rollout.token_budget=256", "rl.max_staleness=2"], "leaves nothing to carry over"),
    (["rollout.token_budget=64", "rl.max_staleness=1"], "need rl.max_staleness >= 2"),
])
def test_partial_rollouts_need_a_budget_below_the_limit_and_room_for_staleness(overrides, words):
    with pytest.raises(ConfigError, match=f"rollout.token_budget: .*{words}"):
        load_config(None, overrides)
    assert load_config(None, ["rollout.token_budget=64", "rl.max_staleness=2"]).rollout.token_budget == 64


@pytest.mark.parametrize("overrides, message", [
    (["cluster.weight_transport=ipc"], "cluster.weight_transport: ipc shares buffers .* set cluster.colocate: true"),
    (["cluster.colocate=true", "cluster.use_gpu=true", "cluster.weight_transport=collective"],
     "cluster.weight_transport: NCCL cannot join two processes on one GPU"),
    (["cluster.colocate=true", "cluster.num_learners=2"], "cluster.num_learners: 2: cluster.colocate pairs"),
    (["cluster.colocate=true", "rollout.num_workers=2"], "rollout.num_workers: 2: cluster.colocate pairs"),
    (["cluster.colocate=true", "rollout.tensor_parallel_size=2"], "rollout.tensor_parallel_size: 2:"),
    (["cluster.colocate=true", "rl.max_staleness=1"], "rl.max_staleness: a colocated engine sleeps"),
])
def test_colocation_pairs_one_learner_with_one_engine_in_lockstep(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)
    cfg = load_config(None, ["cluster.colocate=true", "cluster.use_gpu=true", "cluster.weight_transport=ipc"])
    assert cfg.cluster.colocate and cfg.cluster.weight_transport == "ipc"


@pytest.mark.parametrize("override, words", [
    ("rl.samples_per_promt=8", "did you mean 'samples_per_prompt'"),
    ("rl.samples_per_prompt=eight", "expected int"),
    ("rl.samples_per_prompt", "expected KEY=VALUE"),
    ("sft.joint.phases.3.epochs=1", "no list item '3'"),
    ("rl.tau.x=1", "is a value, not a section"),
])
def test_bad_override_is_named(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert words in str(err.value)
    assert override.split("=")[0] in str(err.value)


def test_resources_by_role_from_yaml_and_overrides(tmp_path):
    cfg = load_config(write(tmp_path, "cluster:\n  rollout_resources: {rollout_node: 1}\n"),
                      ["cluster.learner_resources={learner_node: 0.5}", "cluster.rollout_resources.fast=2"])
    assert cfg.cluster.rollout_resources == {"rollout_node": 1.0, "fast": 2.0}
    assert cfg.cluster.learner_resources == {"learner_node": 0.5}
    assert cfg.cluster.reward_resources == {}


def test_invalid_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "rl: [unclosed\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")


def test_dump_round_trips(tmp_path):
    cfg = load_config(None, ["rl.tau=0.3", "reward.function=my.module:score"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize("path", sorted(glob.glob("configs/*.yaml")))
def test_every_shipped_config_is_valid(path):
    load_config(path)


def test_unknown_section_from_an_override_names_the_override_not_the_file():
    with pytest.raises(ConfigError) as err:
        load_config("configs/tiny.yaml", ["sftt.x=1"])
    assert str(err.value).startswith("command-line override 'sftt.x=1': sftt: unknown key 'sftt'")

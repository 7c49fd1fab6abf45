"""RL raises held-out reward from a weak checkpoint, and the length penalty shortens responses,
through the whole RL system (vLLM rollout worker, reward service, DeepSpeed learner on Ray).

The weak checkpoint is joint SFT on easy built-in tasks where most answers were written as
"It is X." and only some as "\\boxed{X}": it often knows the answer but mostly states it in a form
the answer-only reward does not accept, as an SFT model can miss the answer format a verifier
expects. Sampling still produces the boxed form now and then; RL has to find that it is what
earns reward and make it the policy's answer on held-out prompts it never trained on."""
from __future__ import annotations

import json

import pytest

from kimivl_rl.config import load_config
from kimivl_rl.pipeline import run_pipeline
from kimivl_rl.prepare import ensure_data, with_absolute_paths

pytestmark = pytest.mark.slow

BOXED_SHARE = 1 / 3
EASY_DATA = ["data.joint_sft_examples=3000", "data.long_cot_examples=10", "data.rl_prompts=200",
             "data.eval_examples=60", "data.max_difficulty=1", "sft.eval_examples=60",
             "sft.joint.train_file=joint_sft/weak_train.jsonl", "sft.joint.phases.0.epochs=1"]
RL = ["rl.lr=6e-4", "rl.lr_warmup_steps=0", "rl.kl_coef=0", "rl.iterations=10", "rl.length_penalty_start_iteration=9",
      "rl.eval_every=10", "rl.eval_prompts=60",
      "rl.checkpoint_every=10", "rollout.max_new_tokens=16", "rollout.temperature=1.0"]


def write_weak_answers(data_dir) -> None:
    """joint_sft/weak_train.jsonl: the training rows, two in three answering "It is X."."""
    rows = [json.loads(line) for line in (data_dir / "joint_sft/train.jsonl").open()]
    with (data_dir / "joint_sft/weak_train.jsonl").open("w") as f:
        for i, row in enumerate(rows):
            if i % round(1 / BOXED_SHARE):
                row["messages"][-1]["content"] = f"It is {row['answer']}."
            f.write(json.dumps(row) + "\n")


def test_rl_raises_held_out_reward_from_a_weak_checkpoint(tmp_path, ray_cluster):
    cfg = with_absolute_paths(load_config("configs/tiny.yaml", [
        f"output.dir={tmp_path / 'out'}", f"data.dir={tmp_path / 'data'}",
        f"model.path={tmp_path / 'model'}", *EASY_DATA, *RL]))
    cfg.sft.joint.phases = cfg.sft.joint.phases[:1]  # one short phase
    write_weak_answers(ensure_data(cfg, progress=False))
    rl = run_pipeline(cfg, ["joint", "rl"])["rl"]
    print(rl)
    assert rl["iterations"] == 10
    # 0.0 -> 0.2 at rl.lr=6e-4; 4e-4 gave 0.05 once the built-in data (and so its tokenizer)
    # changed, 2e-4 0.0 (docs/experiments.md)
    assert rl["eval_end"]["eval_reward"] >= rl["eval_start"]["eval_reward"] + 0.1, rl


def write_padded_answers(data_dir) -> None:
    """joint_sft/padded_train.jsonl: every answer right, after 0 to 3 redundant checks."""
    rows = [json.loads(line) for line in (data_dir / "joint_sft/train.jsonl").open()]
    with (data_dir / "joint_sft/padded_train.jsonl").open("w") as f:
        for i, row in enumerate(rows):
            checks = f"Let me check: it is {row['answer']}. " * (i % 4)
            row["messages"][-1]["content"] = f"{checks}\\boxed{{{row['answer']}}}"
            f.write(json.dumps(row) + "\n")


def test_length_penalty_shortens_responses_and_keeps_accuracy(tmp_path, ray_cluster):
    cfg = with_absolute_paths(load_config("configs/tiny.yaml", [
        f"output.dir={tmp_path / 'out'}", f"data.dir={tmp_path / 'data'}",
        f"model.path={tmp_path / 'model'}", *EASY_DATA,
        "sft.joint.train_file=joint_sft/padded_train.jsonl",
        "rl.lr=1e-4", "rl.lr_warmup_steps=0", "rl.kl_coef=0", "rl.iterations=8", "rl.length_penalty_start_iteration=0",
        "rl.length_penalty_weight=1.0", "rl.eval_every=8", "rl.eval_prompts=60",
        "rl.checkpoint_every=8", "rollout.max_new_tokens=48", "rollout.temperature=1.0"]))
    cfg.sft.joint.phases = cfg.sft.joint.phases[:1]
    write_padded_answers(ensure_data(cfg, progress=False))
    run_pipeline(cfg, ["joint", "rl"])
    trained = [json.loads(line) for line in (tmp_path / "out/rl/metrics.jsonl").open()]
    trained = [r for r in trained if "reward_mean" in r]
    first, last = trained[:2], trained[-2:]
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    print([(r["response_length_mean"], r["pass_rate"]) for r in trained])
    assert mean(last, "response_length_mean") <= 0.8 * mean(first, "response_length_mean")
    assert mean(last, "pass_rate") >= mean(first, "pass_rate") - 0.1


def test_rl_starts_from_the_last_finished_sft_stage(tmp_path):
    from kimivl_rl.system.controller import rl_input_model

    cfg = load_config("configs/tiny.yaml", [f"output.dir={tmp_path}"])
    assert rl_input_model(cfg, "base") == "base"
    for stage in ("joint", "long_cot"):
        (tmp_path / f"sft_{stage}" / "model").mkdir(parents=True)
        (tmp_path / f"sft_{stage}" / "model" / "config.json").write_text("{}")
        assert rl_input_model(cfg, "base") == str((tmp_path / f"sft_{stage}" / "model").resolve())
    assert rl_input_model(cfg, "base", override="given") == "given"

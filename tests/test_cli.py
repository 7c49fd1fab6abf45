"""The kimivl-rl command line, run as users run it (the installed console script)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml


def kimivl(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "kimivl_rl.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


def test_help_lists_subcommands():
    script = Path(sys.executable).parent / "kimivl-rl"  # the installed console script
    out = subprocess.run([script, "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("config", "model", "data", "prepare"):
        assert command in out


def test_config_show_applies_overrides():
    result = kimivl("config", "show", "configs/tiny.yaml", "rl.samples_per_prompt=3")
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["rl"]["samples_per_prompt"] == 3


def test_config_check_reports_errors_with_exit_code_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rollout:\n  temprature: 0.5\n")
    result = kimivl("config", "check", bad)
    assert result.returncode == 2
    assert f"{bad}:2: rollout.temprature: unknown key" in result.stderr
    assert "did you mean 'temperature'" in result.stderr
    assert "Traceback" not in result.stderr
    assert kimivl("config", "check", "configs/tiny.yaml").returncode == 0


def test_data_check_names_the_bad_line(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"messages": [{"role": "user", "content": "1+1?"}], "answer": "2"}\n{"messages": 5}\n')
    result = kimivl("data", "check", rows, "--require-answer")
    assert result.returncode == 2 and f"{rows}:2: field 'messages'" in result.stderr
    skipped = kimivl("data", "check", rows, "--skip-bad-rows")
    assert skipped.returncode == 0 and "1 row(s) valid, 1 skipped" in skipped.stdout


def test_prepare_builds_model_and_data_once(tmp_path):
    overrides = [f"model.path={tmp_path}/model", f"data.dir={tmp_path}/data",
                 "data.joint_sft_examples=5", "data.long_cot_examples=5", "data.rl_prompts=5",
                 "data.eval_examples=5"]
    first = kimivl("prepare", "configs/tiny.yaml", *overrides)
    assert first.returncode == 0, first.stderr
    assert (tmp_path / "model" / "model.safetensors").is_file()
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert manifest["spec"]["rl_prompts"] == 5
    stamp = (tmp_path / "model" / "model.safetensors").stat().st_mtime_ns
    assert kimivl("prepare", "configs/tiny.yaml", *overrides).returncode == 0
    assert (tmp_path / "model" / "model.safetensors").stat().st_mtime_ns == stamp  # not rebuilt


def test_prepare_never_overwrites_a_users_checkpoint(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"model_type": "qwen2_5_vl"}')
    result = kimivl("prepare", "configs/tiny.yaml", f"model.path={mine}", f"data.dir={tmp_path}/d",
                    "data.joint_sft_examples=2", "data.long_cot_examples=2", "data.rl_prompts=2",
                    "data.eval_examples=2")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in mine.iterdir()) == ["config.json"]


def test_model_init_cli(tmp_path):
    result = kimivl("model", "init", "--out", tmp_path / "m", "--seed", "3")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "m" / "kimivl_tiny.json").read_text())["seed"] == 3


def test_overrides_without_the_optional_config_use_the_default(tmp_path):
    data = tmp_path / "data"
    result = kimivl("data", "build", f"data.dir={data}", "data.joint_sft_examples=2",
                    "data.long_cot_examples=2", "data.rl_prompts=2", "data.eval_examples=2")
    assert result.returncode == 0, result.stderr
    assert json.loads((data / "manifest.json").read_text())["spec"]["rl_prompts"] == 2


def test_sft_starts_from_the_model_given(tmp_path, monkeypatch, tiny_model_dir, small_data_dir):
    import kimivl_rl.sft.trainer
    from kimivl_rl.cli import main

    started = []

    def run_stage(cfg, stage, base_model, check=True, input_model=None):
        started.append(kimivl_rl.sft.trainer.stage_input_model(cfg, stage, base_model, input_model))
        return {"output_model": "-", "eval": {}}

    monkeypatch.setattr(kimivl_rl.sft.trainer, "run_stage", run_stage)
    config = [str(Path("configs/tiny.yaml").resolve()), f"model.path={tiny_model_dir}",
              "model.init_if_missing=false", f"data.dir={small_data_dir}",
              "data.build_if_missing=false", f"output.dir={tmp_path / 'out'}"]
    monkeypatch.chdir(tiny_model_dir.parent)
    # long-CoT SFT from a checkpoint of the user's (a relative path) rather than joint SFT's output
    assert main(["sft", *config, "--stage", "long_cot", "--model", tiny_model_dir.name]) == 0
    assert main(["sft", *config, "--stage", "joint"]) == 0  # default: model.path
    assert started == [str(tiny_model_dir.resolve())] * 2


def test_eval_names_one_report_per_model(tmp_path, tiny_model_dir):
    result = kimivl("eval", "configs/tiny.yaml", "--model", tiny_model_dir, "--model", tiny_model_dir,
                    "--out", tmp_path / "one.json", f"output.dir={tmp_path / 'out'}")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "--out: 1 given for 2 --model" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()  # stopped before anything was claimed or started
    twins = kimivl("eval", "configs/tiny.yaml", "--model", tiny_model_dir, "--model", tiny_model_dir,
                   f"output.dir={tmp_path / 'out'}")
    assert twins.returncode == 2 and "two models would write the same report" in twins.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_eval_compares_models_prompt_by_prompt(tmp_path, tiny_model_dir, small_data_dir):
    """Two engines of one model answer greedy alike: each report is written, and the comparison
    shows both rows and a change of exactly zero with no error."""
    outs = [tmp_path / "a.json", tmp_path / "b.json"]
    result = kimivl("eval", "configs/tiny.yaml", "--model", tiny_model_dir, "--model", tiny_model_dir,
                    "--out", outs[0], "--out", outs[1], "--limit", 6, "--samples", 0,
                    "--file", small_data_dir / "rl" / "eval.jsonl", f"output.dir={tmp_path / 'out'}",
                    "rollout.max_new_tokens=16", "eval.tier_difficulties=[1]")
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads(out.read_text()) for out in outs]
    assert reports[0]["prompts"] == reports[1]["prompts"] and len(reports[0]["prompts"]["score"]) == 6
    lines = result.stdout.splitlines()
    start = lines.index(f"model 1: {tiny_model_dir}")
    assert lines[start + 1] == f"model 2: {tiny_model_dir}"
    assert [line.split()[:3] for line in lines[start + 4:start + 6]] == [["model", "1", "6"],
                                                                         ["model", "2", "6"]]
    n_tier = reports[0]["slices"]["tier"]["n"]
    assert lines[start + 6:] == [
        "each stage over the one before, on the same prompts (change ± paired SE):",
        "  model 1 -> model 2: all +0.000±0.000"
        + (f"; tier (difficulty 1; n={n_tier}) +0.000±0.000" if n_tier else "")]

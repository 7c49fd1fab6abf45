"""Every config in configs/ passes `kimivl-rl config check`, and the production configs carry
the paper's SFT schedule and production settings. Nothing here loads model weights."""
from __future__ import annotations

from pathlib import Path

import pytest

from kimivl_rl.cli import main
from kimivl_rl.config import load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
PROD = {
    "qwen2_5_vl_3b": "Qwen/Qwen2.5-VL-3B-Instruct",
    "qwen2_5_vl_7b": "Qwen/Qwen2.5-VL-7B-Instruct",
}


def prod_config(name: str):
    return load_config(REPO / "configs" / f"{name}.yaml")


def test_the_production_configs_exist():
    assert {f"{name}.yaml" for name in PROD} <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_check_accepts_every_config(path, capsys):
    assert main(["config", "check", str(path)]) == 0
    # Line by line: a Ray actor torn down by an earlier test may still print into stdout.
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith(f"OK: {path} is a valid config") for line in lines), lines


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_engine_options_hold_each_configs_prompts_and_longest_generation(path):
    from kimivl_rl.rollout.limits import images_per_prompt
    from kimivl_rl.rollout.vllm_engine import engine_options

    cfg = load_config(path)
    options = engine_options(cfg, cfg.model.path)  # a hub name or a missing directory: not read
    longest = max(cfg.rollout.max_new_tokens, cfg.sft.eval_max_new_tokens)
    image_tokens = cfg.data.max_pixels // (28 * 28)  # both families: 28x28 px a token
    prompt_room = options.max_model_len - longest
    assert prompt_room >= cfg.rollout.max_prompt_text_tokens + options.max_images_per_prompt * image_tokens
    assert options.max_images_per_prompt == images_per_prompt(cfg) >= 1
    # Qwen2.5-VL's config.json: 128000 positions.
    assert options.max_model_len <= 128000


@pytest.mark.parametrize("name", sorted(PROD))
def test_prod_config_uses_real_weights_real_data_and_gpus(name):
    cfg = prod_config(name)
    assert cfg.model.path == PROD[name]
    assert cfg.model.init_if_missing is False
    assert cfg.data.build_if_missing is False
    assert cfg.data.dir.startswith("/data/kimivl/") and cfg.output.dir.startswith("/data/kimivl/")
    assert cfg.cluster.use_gpu is True
    assert cfg.model.dtype == "bfloat16"
    assert cfg.cluster.bind_host == "127.0.0.1"


@pytest.mark.parametrize("name", sorted(PROD))
def test_prod_config_has_the_papers_sft_phases(name):
    cfg = prod_config(name)
    joint = [(p.max_seq_len, p.epochs, p.lr_peak, p.lr_final) for p in cfg.sft.joint.phases]
    # Kimi-VL: one epoch at 32K (2e-5 -> 2e-6), then one at 128K re-warmed to 1e-5 -> 1e-6.
    assert joint == [(32768, 1.0, 2e-5, 2e-6), (131072, 1.0, 1e-5, 1e-6)]
    assert all(p.warmup_steps > 0 for p in cfg.sft.joint.phases)
    assert len(cfg.sft.long_cot.phases) == 1
    assert not (cfg.sft.freeze_vision or cfg.sft.freeze_projector)   # all of the model trains
    assert cfg.sft.gradient_checkpointing


@pytest.mark.parametrize("name", sorted(PROD))
def test_prod_config_has_production_rl_settings(name):
    cfg = prod_config(name)
    assert cfg.rollout.num_workers > 1 and cfg.rollout.tensor_parallel_size >= 1
    assert cfg.cluster.num_learners > 1
    assert 8 <= cfg.rl.samples_per_prompt <= 16
    assert cfg.rl.loss == "kimi_pmd" and cfg.rl.reset_optimizer_each_iteration
    # k1.5: the length penalty is switched on after a warm-up without it.
    assert cfg.rl.length_penalty_weight > 0
    assert 0 < cfg.rl.length_penalty_start_iteration < cfg.rl.iterations
    assert cfg.sampler.mode == "prioritized"
    assert cfg.cluster.call_timeout_s >= 600 and cfg.reward.timeout_s > 0
    # Rollouts and learners run at once: an 8-GPU node (3B) or two of them (7B).
    gpus = cfg.cluster.num_learners + cfg.rollout.num_workers * cfg.rollout.tensor_parallel_size
    assert gpus in (8, 16) and cfg.sft.num_workers == gpus


def test_the_7b_model_shards_everything_with_zero_3():
    cfg = prod_config("qwen2_5_vl_7b")
    assert (cfg.sft.zero_stage, cfg.rl.zero_stage) == (3, 3)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_config_names_a_supported_family_and_runs_no_remote_code(path):
    from kimivl_rl.models.families import FAMILIES, configured_family

    cfg = load_config(path)
    assert configured_family(cfg).name in FAMILIES
    assert cfg.model.trust_remote_code is False


def test_config_check_refuses_a_model_of_an_unsupported_architecture(tmp_path, capsys):
    model = tmp_path / "internvl"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "internvl"}')
    assert main(["config", "check", "configs/tiny.yaml", f"model.path={model}"]) == 2
    err = capsys.readouterr().err
    assert f"{model}/config.json: model type 'internvl' is not supported" in err


def test_a_typo_in_a_prod_config_fails_with_exit_code_2_naming_the_key(tmp_path, capsys):
    text = (REPO / "configs" / "qwen2_5_vl_7b.yaml").read_text()
    assert text.count("  samples_per_prompt:") == 1
    bad = tmp_path / "typo.yaml"
    bad.write_text(text.replace("  samples_per_prompt:", "  samples_per_promt:"))
    assert main(["config", "check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "rl.samples_per_promt" in err and "unknown key" in err
    assert "did you mean 'samples_per_prompt'" in err

"""The family adapter: which family a config or a model is, refused where none fits, and what
each family tells the rest of the code (vision tokens, engine image limits, prompt budget)."""
from __future__ import annotations

import json

import pytest

from kimivl_rl.config import ConfigError, load_config
from kimivl_rl.models.families import FAMILIES, configured_family, family_of
from kimivl_rl.rollout.limits import prompt_budget

TINY = "configs/tiny.yaml"


def _model_dir(tmp_path, model_type: str, name: str = "m"):
    directory = tmp_path / name
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": model_type}))
    return directory


def test_a_local_model_decides_the_family_and_a_contradicting_setting_is_refused(tmp_path):
    kimi = _model_dir(tmp_path, "kimi_k25")
    cfg = load_config(TINY, [f"model.path={kimi}"])
    assert configured_family(cfg).name == "kimi_k25"
    with pytest.raises(ConfigError, match=r"model.family: 'qwen2_5_vl', but the model at .* is kimi_k25"):
        configured_family(load_config(TINY, [f"model.path={kimi}", "model.family=qwen2_5_vl"]))


def test_an_unsupported_architecture_is_named(tmp_path):
    other = _model_dir(tmp_path, "internvl")
    with pytest.raises(ConfigError, match=r"config.json: model type 'internvl' is not supported.*qwen2_5_vl, kimi_k25, kimi_vl"):
        configured_family(load_config(TINY, [f"model.path={other}"]))


def test_a_hub_name_needs_the_family_set_and_a_tiny_model_takes_the_configured_one():
    hub = ["model.path=org/some-vlm", "model.init_if_missing=false"]
    with pytest.raises(ConfigError, match="model.family: auto cannot tell the family of org/some-vlm"):
        configured_family(load_config(TINY, hub))
    assert configured_family(load_config(TINY, [*hub, "model.family=kimi_k25"])).name == "kimi_k25"
    # a tiny model still to be built: the default architecture, or the one asked for
    assert configured_family(load_config(TINY, ["model.path=/nonexistent/m"])).name == "qwen2_5_vl"
    assert configured_family(load_config(TINY, ["model.path=/nonexistent/m", "model.family=kimi_k25"])).name == "kimi_k25"


def test_the_prompt_budget_counts_each_familys_image_markers():
    # 112 x 112 pixels: 16 vision tokens; Qwen2.5-VL adds 2 markers, Kimi K2.5 up to 5.
    base = ["data.max_pixels=12544", "rollout.max_prompt_text_tokens=100", "model.path=/nonexistent/m"]
    assert prompt_budget(load_config(TINY, base)) == 100 + 16 + 2
    assert prompt_budget(load_config(TINY, [*base, "model.family=kimi_k25"])) == 100 + 16 + 5


def test_the_tiny_model_is_qwen2_5_vl_and_its_family_counts_its_vision_tokens(tiny_model_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from PIL import Image

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    family = family_of(model)
    assert family.name == "qwen2_5_vl" and family.image_token_id == model.config.image_token_id
    pixels, grid = family.encode_images(processor, [Image.new("RGB", (112, 112)), Image.new("RGB", (224, 112))])
    assert grid.tolist() == [[1, 8, 8], [1, 8, 16]] and pixels.shape[0] == 64 + 128
    assert family.vision_token_counts(processor, grid) == [16, 32]
    names = [n for n, _ in model.named_parameters()]
    for prefixes in (family.vision_prefixes, family.projector_prefixes):
        assert any(n.startswith(prefixes) for n in names)
    assert FAMILIES["qwen2_5_vl"].vllm_image_limits(2) == {"image": 2, "video": 0}
    assert FAMILIES["kimi_k25"].vllm_image_limits(2) == {"vision_chunk": 2}

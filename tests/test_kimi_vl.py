"""The Kimi-VL family without the published checkpoints' code: a model directory in their
layout (config.json, preprocessor_config.json and their ``auto_map``, parameter names) loads
into kimivl-rl's own classes while the code files it names would fail if run; the weights go
back out under the published names; the processor counts an image's tokens as vLLM's Kimi-VL
input processing does. vLLM against the learner: tests/test_family_parity.py."""
from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from kimivl_rl.config import load_config
from kimivl_rl.models.tiny import TinyVLMSpec, build_tiny_vlm
from kimivl_rl.prepare import tiny_corpus

CODE_FILES = {"configuration_kimi_vl.py", "modeling_kimi_vl.py", "processing_kimi_vl.py",
              "image_processing_kimi_vl.py"}
CONFIG_AUTO_MAP = {"AutoConfig": "configuration_kimi_vl.KimiVLConfig",
                   "AutoModel": "modeling_kimi_vl.KimiVLForConditionalGeneration",
                   "AutoModelForCausalLM": "modeling_kimi_vl.KimiVLForConditionalGeneration"}


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A tiny Kimi-VL as the hub publishes one: config.json with its auto_map and the code files
    beside it, each raising if anything runs it."""
    model_dir = build_tiny_vlm(tmp_path_factory.mktemp("kimi_vl") / "model", TinyVLMSpec(family="kimi_vl"), tiny_corpus())
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "auto_map": CONFIG_AUTO_MAP}))
    for name in CODE_FILES:
        (model_dir / name).write_text(f"raise RuntimeError('{name} ran')\n")
    return model_dir


def test_a_published_layout_loads_into_kimivl_rls_classes_without_running_its_code(published):
    from kimivl_rl.models.families import family_of
    from kimivl_rl.models.loading import load_policy

    cfg = load_config("configs/tiny.yaml", [f"model.path={published}", "model.family=auto"])
    assert cfg.model.trust_remote_code is False
    model, processor = load_policy(str(published), cfg)
    assert type(model).__module__ == "kimivl_rl.models.families.kimi_vl_model"
    assert type(processor).__module__ == "kimivl_rl.models.families.kimi_vl_processing"
    assert type(processor.image_processor).__name__ == "KimiVLImageProcessor"
    # The weight sync and saved checkpoints use the published names and tensors, exactly.
    published_weights = load_file(published / "model.safetensors")
    layout = family_of(model).checkpoint_layout(model.state_dict())
    assert sorted(layout) == sorted(published_weights)
    assert all(torch.equal(layout[name], tensor) for name, tensor in published_weights.items())


def test_a_saved_model_keeps_the_published_layout(published, tmp_path):
    from transformers import AutoModelForImageTextToText

    from kimivl_rl.models.families import register_local_classes

    register_local_classes(published)
    model = AutoModelForImageTextToText.from_pretrained(published)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert sorted(saved) == sorted(load_file(published / "model.safetensors"))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "kimi_vl" and config["vision_config"]["init_pos_emb_height"] == 16
    assert config["media_placeholder_token_id"] == model.config.media_placeholder_token_id


@pytest.mark.parametrize("size", [(112, 112), (150, 100), (30, 500), (700, 420)])
def test_the_processor_counts_an_images_tokens_as_vllm_does(published, size):
    from transformers import AutoProcessor
    from vllm.model_executor.models.kimi_vl import KimiVLProcessingInfo

    processor = AutoProcessor.from_pretrained(published)
    processor.image_processor.in_token_limit = 1024   # (700, 420) is scaled down to the limit
    image = Image.new("RGB", size, (200, 30, 30))
    encoded = processor(text=["a <|media_pad|> b"], images=[image], return_tensors="pt")
    vllm_count = KimiVLProcessingInfo.get_num_image_tokens(
        SimpleNamespace(get_hf_processor=lambda: processor), image_width=size[0], image_height=size[1])
    tokens = int((encoded["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<|media_pad|>")).sum())
    assert tokens == vllm_count == len(encoded["pixel_values"]) // 4
    h, w = encoded["image_grid_hws"][0].tolist()
    assert h % 2 == w % 2 == 0  # padded to whole 2x2 merge windows

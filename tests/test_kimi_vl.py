"""The Kimi-VL family without the published checkpoints' code: a model directory in their
layout (config.json, preprocessor_config.json, tokenizer_config.json and their ``auto_map``,
tiktoken.model, parameter names) loads
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
              "image_processing_kimi_vl.py", "tokenization_moonshot.py"}
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
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    (model_dir / "tokenizer_config.json").write_text(json.dumps(
        {**tokenizer_config, "auto_map": {"AutoTokenizer": ["tokenization_moonshot.TikTokenTokenizer", None]}}))
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


TOKENIZER_TEXTS = ["How many red squares are in the image? Answer in \\boxed{}.",
                   "What is 37 + 48 - 12? 12345678 digits, 3.14159",
                   "Déjà vu: ¿Qué? naïve CAFÉ it's they're I'LL ok\n\n\t  tabs   end  ",
                   "你好，世界！混合 English 和中文 123",
                   "emoji 🙂🚀 and symbols <>{}[]()#@!$%^&*_-+=|\\/~`",
                   "<think>3 + 5 = 8.</think>\\boxed{8}<|im_end|>[EOS]<|media_pad|>"]


def test_the_tokenizer_splits_and_merges_as_tiktoken_does(published):
    """The published ``tiktoken.model`` through kimivl-rl's ``TikTokenTokenizer`` (the checkpoint's
    ``tokenization_moonshot.py`` raises if run) against tiktoken itself with Moonshot's pattern:
    the same ids for every text, special tokens included, and the text back from the ids."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    from transformers import AutoTokenizer

    from kimivl_rl.models.families import register_local_classes
    from kimivl_rl.models.families.kimi_vl_tokenizer import PATTERN, TikTokenTokenizer

    register_local_classes(published)
    tokenizer = AutoTokenizer.from_pretrained(published, trust_remote_code=False)
    assert type(tokenizer) is TikTokenTokenizer
    ranks = load_tiktoken_bpe(str(published / "tiktoken.model"))
    specials = {t.content: i for i, t in tokenizer.added_tokens_decoder.items()}
    assert sorted(specials.values()) == list(range(len(ranks), len(ranks) + 256))
    oracle = tiktoken.Encoding(name="kimi_vl", pat_str=PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    for text in TOKENIZER_TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert ids == oracle.encode(text, allowed_special="all"), text
        assert tokenizer.decode(ids) == text
    # The thinking markers survive decoding without special tokens; the turn markers do not.
    ids = tokenizer.encode("<think>x</think>y<|im_end|>", add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<think>x</think>y"


def test_the_tokenizer_saves_in_the_published_layout(published, tmp_path):
    from transformers import AutoTokenizer

    from kimivl_rl.models.families import register_local_classes

    register_local_classes(published)
    tokenizer = AutoTokenizer.from_pretrained(published)
    tokenizer.save_pretrained(tmp_path)
    assert not (tmp_path / "tokenizer.json").exists()
    assert (tmp_path / "tiktoken.model").read_bytes() == (published / "tiktoken.model").read_bytes()
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.added_tokens_decoder == tokenizer.added_tokens_decoder
    assert all(again.encode(t) == tokenizer.encode(t) for t in TOKENIZER_TEXTS)


def test_sft_trains_the_reasoning_a_kimi_template_does_not_render(published):
    """Kimi-VL's chat template drops ``reasoning_content``; SFT writes it into the answer between
    the thinking markers instead, so a long-CoT row trains its trace (Qwen's tiny template, which
    renders it itself: tests/test_sft_math.py, same labels)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from kimivl_rl.models.families import family_of, register_local_classes
    from kimivl_rl.sft.encode import encode_example, renders_reasoning
    from test_sft_math import MULTI_TURN, labelled_runs

    register_local_classes(published)
    processor = AutoProcessor.from_pretrained(published)
    assert not renders_reasoning(processor)
    family = family_of(AutoModelForImageTextToText.from_pretrained(published))
    encoded = encode_example(MULTI_TURN, processor, family, ("<think>", "</think>"))
    assert labelled_runs(encoded, processor.tokenizer) == [
        "\\boxed{red}<|im_end|>", "<think>First I will add. Wait, 5.</think>\\boxed{5}<|im_end|>"]


@pytest.mark.slow
def test_rl_samples_and_trains_a_published_layout_without_its_code(published, small_data_dir, tmp_path):
    """The published-layout directory (every code file it names raises if run) through one RL
    iteration: vLLM's native Kimi-VL samples it with kimivl-rl's tokenizer and processor, the
    learner trains it, and the weights it saves keep the published names."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    run = [sys.executable, "-m", "kimivl_rl.cli", "rl", "configs/tiny_kimi.yaml", "--model", str(published),
           "model.family=auto", f"model.path={published}", "model.init_if_missing=false",
           f"data.dir={small_data_dir}", "data.build_if_missing=false", f"output.dir={tmp_path / 'out'}",
           "reward.function=reward_plugins:mentions_a_digit", "rl.iterations=1",
           "rl.prompts_per_iteration=2", "rl.samples_per_prompt=4", "rl.eval_prompts=2",
           "rl.dynamic_sampling_rounds=0", "rl.drop_zero_advantage_groups=false",
           "eval.samples=0", "rollout.max_new_tokens=16", "rollout.temperature=1.0",
           "rollout.gpu_memory_utilization=0.1"]
    env = dict(os.environ, PYTHONPATH=f"{root}:{root / 'tests'}")
    done = subprocess.run(run, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-5000:]
    rows = [json.loads(line) for line in (tmp_path / "out" / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [r["learner_responses"] for r in rows if "learner_responses" in r] == [8]
    saved = load_file(tmp_path / "out" / "rl" / "model" / "model.safetensors")
    assert sorted(saved) == sorted(load_file(published / "model.safetensors"))
    assert not any((tmp_path / "out" / "rl" / "model" / name).exists() for name in CODE_FILES)

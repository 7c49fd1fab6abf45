"""The tiny VLM: built offline and deterministically, loads with the Auto classes, and
generates from an image prompt in transformers and in vLLM, with matching log-probabilities."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from kimivl_rl.infra.ownership import NotOursError
from kimivl_rl.models.tiny import TinyVLMSpec, build_tiny_vlm
from kimivl_rl.prepare import tiny_corpus

IMAGE_PROMPT = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": "How many red squares are in the image?"}]}]


def red_squares_image() -> Image.Image:
    image = Image.new("RGB", (112, 112), "white")
    image.paste((220, 30, 30), (4, 4, 24, 24))
    image.paste((220, 30, 30), (60, 60, 80, 80))
    return image


def test_same_seed_same_files_other_seed_other_weights(tmp_path, tiny_model_dir):
    again = build_tiny_vlm(tmp_path / "again", TinyVLMSpec(seed=0), tiny_corpus())
    for name in ("tokenizer.json", "config.json", "chat_template.jinja", "processor_config.json"):
        assert (again / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name
    ours, theirs = load_file(tiny_model_dir / "model.safetensors"), load_file(again / "model.safetensors")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    other = load_file(build_tiny_vlm(tmp_path / "other", TinyVLMSpec(seed=1), tiny_corpus()) / "model.safetensors")
    assert not all(torch.equal(ours[k], other[k]) for k in ours)


def test_a_tiny_model_is_replaced_only_while_it_holds_nothing_else(tmp_path):
    out = build_tiny_vlm(tmp_path / "model", TinyVLMSpec(seed=0), tiny_corpus())
    build_tiny_vlm(out, TinyVLMSpec(seed=1), tiny_corpus())  # only what the build wrote: replaced
    (out / "notes.txt").write_text("mine")
    with pytest.raises(NotOursError, match="notes.txt"):
        build_tiny_vlm(out, TinyVLMSpec(seed=2), tiny_corpus())
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    (out / "config.json").write_text("{}")  # a file of the build, changed by someone
    with pytest.raises(NotOursError, match="config.json"):
        build_tiny_vlm(out, TinyVLMSpec(seed=2), tiny_corpus())
    assert (out / "config.json").read_text() == "{}"


def test_a_tiny_model_recorded_before_builds_listed_their_files_is_replaced_by_its_names(tmp_path):
    out = build_tiny_vlm(tmp_path / "model", TinyVLMSpec(seed=0), tiny_corpus())
    older = json.loads((out / "kimivl_tiny.json").read_text())
    del older["files"], older["family"]
    (out / "kimivl_tiny.json").write_text(json.dumps(older))
    (out / "notes.txt").write_text("mine")
    with pytest.raises(NotOursError, match="notes.txt"):
        build_tiny_vlm(out, TinyVLMSpec(seed=1), tiny_corpus())
    (out / "notes.txt").unlink()
    build_tiny_vlm(out, TinyVLMSpec(seed=1), tiny_corpus())  # only a build's file names: replaced
    assert json.loads((out / "kimivl_tiny.json").read_text())["seed"] == 1
    assert not list(tmp_path.glob("*.partial"))  # no staging left behind, refused or not


def test_architecture_fits_vllm_cpu_and_two_cores(tiny_model_dir):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    text, vision = config["text_config"], config["vision_config"]
    assert config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert text["hidden_size"] // text["num_attention_heads"] >= 32
    assert vision["hidden_size"] // vision["num_heads"] >= 32
    assert sum(text["rope_parameters"]["mrope_section"]) * 2 == text["hidden_size"] // text["num_attention_heads"]
    weights = load_file(tiny_model_dir / "model.safetensors")
    assert sum(t.numel() for t in weights.values()) < 5_000_000


def test_chat_template_renders_thinking_and_images(tiny_model_dir):
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    chat = IMAGE_PROMPT + [{"role": "assistant", "reasoning_content": "First I will count.",
                            "content": "\\boxed{2}"}]
    text = processor.apply_chat_template(chat, tokenize=False)
    assert text == ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>How many red "
                    "squares are in the image?<|im_end|>\n<|im_start|>assistant\n"
                    "<think>First I will count.</think>\\boxed{2}<|im_end|>\n")
    prompt = processor.apply_chat_template(IMAGE_PROMPT, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    tokens = processor.tokenizer.tokenize("<think>12</think>")
    assert tokens == ["<think>", "1", "2", "</think>"]  # markers whole, digits one by one
    decoded = processor.tokenizer.decode(processor.tokenizer.encode("<think>a</think>b"),
                                         skip_special_tokens=True)
    assert decoded == "<think>a</think>b"  # thinking markers survive decoding


def test_custom_thinking_markers(tmp_path):
    spec = TinyVLMSpec(think_open="◁think▷", think_close="◁/think▷", vocab_size=300)
    processor = AutoProcessor.from_pretrained(build_tiny_vlm(tmp_path / "kimi", spec, tiny_corpus()))
    chat = [{"role": "user", "content": "1 + 1?"},
            {"role": "assistant", "reasoning_content": "easy", "content": "2"}]
    assert "◁think▷easy◁/think▷2" in processor.apply_chat_template(chat, tokenize=False)
    assert processor.tokenizer.tokenize("◁think▷") == ["◁think▷"]


def hf_inputs(model_dir):
    processor = AutoProcessor.from_pretrained(model_dir)
    prompt = processor.apply_chat_template(IMAGE_PROMPT, tokenize=False, add_generation_prompt=True)
    return processor, prompt, processor(text=[prompt], images=[red_squares_image()], return_tensors="pt")


def test_transformers_generates_from_an_image(tiny_model_dir):
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    processor, _, inputs = hf_inputs(tiny_model_dir)
    assert inputs["image_grid_thw"].tolist() == [[1, 8, 8]]  # 112 px -> 8x8 patches -> 16 tokens
    image_id = model.config.image_token_id
    assert int((inputs["input_ids"] == image_id).sum()) == 16
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 6
    # The image reaches the output: another image changes the logits.
    with torch.no_grad():
        first = model(**inputs).logits[0, -1]
        blank = processor(text=[processor.apply_chat_template(IMAGE_PROMPT, tokenize=False,
                                                              add_generation_prompt=True)],
                          images=[Image.new("RGB", (112, 112), "white")], return_tensors="pt")
        second = model(**blank).logits[0, -1]
    assert not torch.allclose(first, second)

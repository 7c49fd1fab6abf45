"""Engine limits from the config: `config check` refuses an engine that cannot hold its own
generations; `rollout.max_images_per_prompt: auto` takes the most images a row of the data holds,
and a row over an explicit limit stops `config check` and `eval` before any engine starts; a real
vLLM engine built from the config generates past 2,048 tokens, and a two-image row goes through
rollout generation, the learner's log-probability pass and SFT encoding."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from kimivl_rl.cli import main
from kimivl_rl.config import ConfigError, load_config
from kimivl_rl.data.rows import Example, RowLoader
from kimivl_rl.prepare import checked_config
from kimivl_rl.rollout.limits import fit_images, images_per_prompt, prompt_budget
from kimivl_rl.training.packing import IGNORE_INDEX
from test_cli import kimivl
from test_tiny_model import red_squares_image

TINY = "configs/tiny.yaml"
TWO_IMAGES = {"messages": [{"role": "user", "content": [
    {"type": "image"}, {"type": "image"},
    {"type": "text", "text": "How many red squares are in the two images?"}]},
    {"role": "assistant", "content": "\\boxed{2}"}],
    "images": ["images/a.png", "images/b.png"], "answer": "2"}


def two_image_data(root):
    """A data directory whose RL training file holds one row with two images."""
    (root / "rl" / "images").mkdir(parents=True)
    red_squares_image().save(root / "rl" / "images" / "a.png")
    Image.new("RGB", (112, 112), (40, 70, 220)).save(root / "rl" / "images" / "b.png")
    (root / "rl" / "train.jsonl").write_text(json.dumps(TWO_IMAGES) + "\n")
    return root


def config_check(capsys, *overrides) -> tuple[int, str]:
    code = main(["config", "check", TINY, *overrides])
    return code, capsys.readouterr().err


def test_config_check_refuses_a_context_shorter_than_prompt_and_generation(capsys):
    code, err = config_check(capsys, "rollout.max_model_len=512")
    assert code == 2 and "rollout.max_model_len: 512 tokens cannot hold" in err
    assert "rollout.max_new_tokens=256" in err
    assert config_check(capsys, "rollout.max_model_len=4096")[0] == 0


def test_config_check_refuses_a_context_past_a_local_models_positions(capsys, tiny_model_dir):
    code, err = config_check(capsys, f"model.path={tiny_model_dir}", "rollout.max_new_tokens=8192")
    assert code == 2 and "rollout.max_model_len" in err
    assert "the 4096 positions" in err and "max_position_embeddings" in err
    assert config_check(capsys, f"model.path={tiny_model_dir}", "rollout.max_new_tokens=2048")[0] == 0


def test_config_check_refuses_rows_with_more_images_than_an_explicit_limit(capsys, tmp_path):
    data = f"data.dir={two_image_data(tmp_path)}"
    code, err = config_check(capsys, data, "data.build_if_missing=false",
                             "rollout.max_images_per_prompt=1")
    assert code == 2 and "rollout.max_images_per_prompt" in err
    assert f"{tmp_path / 'rl' / 'train.jsonl'}:1 has 2 images" in err
    assert config_check(capsys, data, "data.build_if_missing=false",
                        "rollout.max_images_per_prompt=2")[0] == 0
    assert main(["config", "check", TINY, data, "data.build_if_missing=false"]) == 0  # auto
    assert "2 image(s) per prompt" in capsys.readouterr().out


def example(images: int, line: int) -> Example:
    return Example(messages=[], images=[red_squares_image()] * images, answer="2", difficulty=None,
                   pass_rate=None, source=f"rows.jsonl:{line}")


ROWS = [example(0, 1), example(2, 2), example(1, 3), example(2, 4)]


def test_auto_takes_the_most_images_one_row_holds():
    cfg = load_config(TINY)
    assert cfg.rollout.max_images_per_prompt == "auto"  # the default
    assert fit_images(cfg, ROWS).rollout.max_images_per_prompt == 2
    assert fit_images(cfg, [example(0, 1)]).rollout.max_images_per_prompt == 1  # text only
    explicit = load_config(TINY, ["rollout.max_images_per_prompt=3"])
    assert fit_images(explicit, ROWS) == explicit


def test_a_row_over_an_explicit_limit_names_its_file_line_and_the_key():
    with pytest.raises(ConfigError) as err:
        fit_images(load_config(TINY, ["rollout.max_images_per_prompt=1"]), ROWS)
    assert str(err.value) == ("rollout.max_images_per_prompt: rows.jsonl:2 has 2 images, over the "
                              "limit of 1 an engine takes in one prompt; set "
                              "rollout.max_images_per_prompt=2 or more, or auto")


def test_the_engines_take_the_fitted_limit_and_auto_unfitted_is_one_image():
    from kimivl_rl.rollout.vllm_engine import engine_options

    cfg = load_config(TINY, ["model.path=/nonexistent/m"])
    fitted = fit_images(cfg, ROWS)
    assert images_per_prompt(cfg) == engine_options(cfg, cfg.model.path).max_images_per_prompt == 1
    assert engine_options(fitted, cfg.model.path).max_images_per_prompt == 2
    assert prompt_budget(fitted) - prompt_budget(cfg) == prompt_budget(cfg) - \
        cfg.rollout.max_prompt_text_tokens  # room for one more image


def test_checked_config_fits_auto_to_the_stages_files(tmp_path):
    cfg = load_config(TINY, [f"data.dir={two_image_data(tmp_path)}", "data.build_if_missing=false"])
    assert checked_config(cfg, ["rl"], missing_ok=True).rollout.max_images_per_prompt == 2
    assert checked_config(cfg, ["joint"], missing_ok=True).rollout.max_images_per_prompt == 1


def test_eval_stops_at_a_row_over_the_limit_before_ray_or_an_engine_starts(tmp_path,
                                                                           tiny_model_dir):
    rows = two_image_data(tmp_path / "data") / "rl" / "train.jsonl"
    result = kimivl("eval", TINY, "--model", tiny_model_dir, "--file", rows, "--out",
                    tmp_path / "report.json", "rollout.max_images_per_prompt=1")
    assert result.returncode == 2, result.stderr[-2000:]
    assert (f"kimivl-rl: error: rollout.max_images_per_prompt: {rows}:1 has 2 images, over the "
            f"limit of 1") in result.stderr
    assert "Traceback" not in result.stderr and "VLLMValidationError" not in result.stderr
    assert "Started a local Ray instance" not in result.stderr
    assert "vllm" not in result.stderr.lower()
    assert not (tmp_path / "report.json").exists()


def test_the_built_in_data_fits_the_tiny_engine(small_data_dir):
    from kimivl_rl.prepare import check_data

    cfg = load_config(TINY, [f"data.dir={small_data_dir}"])
    assert check_data(cfg)  # one image per row at most: the default limit


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    """A vLLM engine built from the tiny config, asked for 2,100 new tokens and two images."""
    from kimivl_rl.rollout.vllm_engine import VLLMEngine, engine_options

    cfg = load_config(TINY, ["rollout.max_new_tokens=2100", "rollout.max_images_per_prompt=2"])
    threads_before = torch.get_num_threads()
    engine = VLLMEngine(engine_options(cfg, str(tiny_model_dir)))
    yield engine
    engine.shutdown()
    torch.set_num_threads(threads_before)


@pytest.mark.slow
def test_an_engine_from_the_config_generates_past_2048_tokens(engine):
    from vllm import SamplingParams

    assert engine.options.max_model_len > 2100
    prompt = "<|im_start|>user\nCount to a thousand.<|im_end|>\n<|im_start|>assistant\n"
    # ignore_eos: the untrained model may end early; greedy: seeded sampling is slow on CPU.
    params = SamplingParams(max_tokens=2100, temperature=0.0, ignore_eos=True)
    (result,) = engine.llm.generate([prompt], params, use_tqdm=False)
    assert len(result.outputs[0].token_ids) == 2100 and result.outputs[0].finish_reason == "length"


@pytest.mark.slow
def test_a_two_image_row_rolls_out_scores_in_the_learner_and_encodes_for_sft(engine, tiny_model_dir,
                                                                              tmp_path):
    from kimivl_rl.evaluation import generation_requests
    from kimivl_rl.models.loading import load_policy
    from kimivl_rl.rl.experience import trajectories_from_samples
    from kimivl_rl.models.families import family_of
    from kimivl_rl.system.learner import encode_trajectories, response_logprobs
    from kimivl_rl.sft.encode import encode_example

    (row,) = RowLoader(two_image_data(tmp_path) / "rl" / "train.jsonl", require_answer=True)
    model, processor = load_policy(str(tiny_model_dir), load_config(TINY), training=True)
    model.eval()
    image_id = model.config.image_token_id
    (samples,) = engine.generate(generation_requests([row], processor), n=2, temperature=1.0,
                                 max_new_tokens=12, seed=0)
    assert all(s.prompt_token_ids.count(image_id) == 2 * 16 for s in samples)  # 112 px: 16 each

    trajectories = trajectories_from_samples([0], [row.images], [samples])
    sequences = encode_trajectories(trajectories, processor, family_of(model))
    with torch.no_grad():
        learner = response_logprobs(model, sequences, family_of(model))  # both samples in one pack
    for sample, logprobs in zip(samples, learner, strict=True):
        torch.testing.assert_close(logprobs, torch.tensor(sample.logprobs), atol=2e-3, rtol=0)

    encoded = encode_example(row, processor, family_of(model))
    assert encoded.image_grid_thw.tolist() == [[1, 8, 8]] * 2
    assert int((encoded.input_ids == image_id).sum()) == 2 * 16
    answer = encoded.input_ids[encoded.labels != IGNORE_INDEX].tolist()
    assert processor.tokenizer.decode(answer).startswith("\\boxed{2}")

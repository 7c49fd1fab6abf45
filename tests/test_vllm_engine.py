"""The vLLM adapter's engine placement: an in-process engine (the CPU default) samples what the
engine in separate processes samples, spawns no process, and leaves the calling process's torch
threads as configured, also when a second engine follows in the same process (Ray reuses task
workers); reloaded weights really replace the old ones, without warnings."""
from __future__ import annotations

import logging

import psutil
import pytest
import torch

from kimivl_rl.config import load_config
from kimivl_rl.rollout.vllm_engine import EngineOptions, VLLMEngine, engine_options
from kimivl_rl.types import GenerationRequest
from test_tiny_model import hf_inputs, red_squares_image


def test_engine_runs_in_process_on_cpu_with_one_worker_unless_the_config_says_otherwise():
    cfg = load_config("configs/tiny.yaml")
    options = engine_options(cfg, "m")
    assert options.in_process and options.threads == cfg.cluster.rollout_threads == 2
    cfg.rollout.tensor_parallel_size = 2
    assert not engine_options(cfg, "m").in_process
    cfg.rollout.tensor_parallel_size = 1
    cfg.cluster.use_gpu = True
    assert not engine_options(cfg, "m").in_process
    cfg.rollout.in_process = True
    assert engine_options(cfg, "m").in_process
    cfg.cluster.use_gpu, cfg.rollout.in_process = False, False
    assert not engine_options(cfg, "m").in_process


def test_a_family_newer_than_the_installed_vllm_is_refused_by_name(monkeypatch):
    import vllm

    from kimivl_rl.config import ConfigError

    monkeypatch.setattr(vllm, "__version__", "0.24.0")  # scripts/setup.sh's GPU set
    assert engine_options(load_config("configs/tiny.yaml"), "m").family == "qwen2_5_vl"
    with pytest.raises(ConfigError, match=r"model.family: kimi_k25 needs vLLM 0.32 or newer .* has 0.24.0"):
        engine_options(load_config("configs/tiny_kimi.yaml"), "m")


def _requests(model_dir) -> list[GenerationRequest]:
    _, prompt, _ = hf_inputs(model_dir)
    return [GenerationRequest(prompt=prompt, images=[red_squares_image()], request_id="image"),
            GenerationRequest(prompt=prompt.replace("<|vision_start|><|image_pad|><|vision_end|>", ""),
                              request_id="text")]


@pytest.mark.slow
def test_in_process_engine_samples_like_separate_processes_and_keeps_the_process_as_it_was(
        tiny_model_dir):
    requests = _requests(tiny_model_dir)
    sample = dict(n=2, temperature=1.0, max_new_tokens=12, seed=3)
    separate = VLLMEngine(EngineOptions(model=str(tiny_model_dir), dtype="float32", in_process=False))
    assert psutil.Process().children(recursive=True)  # the engine core runs in a child process
    expected = separate.generate(requests, **sample)
    separate.shutdown()

    real_set_num_threads, threads_before = torch.set_num_threads, torch.get_num_threads()
    try:
        for _ in range(2):
            children = {p.pid for p in psutil.Process().children(recursive=True)}
            engine = VLLMEngine(EngineOptions(model=str(tiny_model_dir), dtype="float32",
                                              in_process=True, threads=1))
            assert {p.pid for p in psutil.Process().children(recursive=True)} <= children
            assert torch.set_num_threads is real_set_num_threads
            assert torch.get_num_threads() == 1
            got = engine.generate(requests, **sample)
            engine.shutdown()
            for want_group, got_group in zip(expected, got, strict=True):
                for want, have in zip(want_group, got_group, strict=True):
                    assert have.token_ids == want.token_ids
                    torch.testing.assert_close(torch.tensor(have.logprobs),
                                               torch.tensor(want.logprobs), atol=1e-4, rtol=0)
    finally:
        torch.set_num_threads(threads_before)


@pytest.mark.slow
def test_reloaded_weights_change_what_the_engine_scores_and_log_no_warning(tiny_model_dir):
    from safetensors.torch import load_file

    requests = _requests(tiny_model_dir)
    greedy = dict(n=1, temperature=0.0, max_new_tokens=8, seed=0)
    original = load_file(str(tiny_model_dir / "model.safetensors"))
    noise = torch.Generator().manual_seed(0)
    perturbed = {k: v + 0.1 * torch.randn(v.shape, generator=noise) if v.is_floating_point() else v
                 for k, v in original.items()}
    threads_before = torch.get_num_threads()
    engine = VLLMEngine(EngineOptions(model=str(tiny_model_dir), dtype="float32", in_process=True,
                                      threads=1, log_level="INFO"))
    warnings = []
    catcher = logging.Handler(logging.INFO)
    catcher.emit = warnings.append
    logging.getLogger("vllm").addHandler(catcher)  # after the engine: importing vLLM resets it
    try:
        before = engine.generate(requests, **greedy)
        engine.load_weights(perturbed)
        changed = engine.generate(requests, **greedy)
        engine.load_weights(original)
        back = engine.generate(requests, **greedy)
    finally:
        engine.shutdown()
        logging.getLogger("vllm").removeHandler(catcher)
        torch.set_num_threads(threads_before)
    assert [r.getMessage() for r in warnings] == []  # no warning, and no INFO line per reload
    logprobs = lambda result: torch.tensor([g[0].logprobs[0] for g in result])  # noqa: E731
    assert not torch.allclose(logprobs(changed), logprobs(before), atol=1e-3)
    torch.testing.assert_close(logprobs(back), logprobs(before), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_a_continued_response_is_scored_as_if_generated_in_one_go(tiny_model_dir):
    """Partial rollouts: a response cut after 6 tokens and continued in a second call (its tokens
    going back in as token ids, images expanded again by vLLM), one sample beside fresh requests
    of 3 samples each as the RL loop batches them, carries log-probabilities equal to the whole
    sequence's teacher-forced ones. The model is made peaked (its output layer scaled
    up) so that a wrong prefix or position would show."""
    from dataclasses import replace

    from safetensors.torch import load_file
    from vllm import SamplingParams

    requests = _requests(tiny_model_dir)
    weights = load_file(str(tiny_model_dir / "model.safetensors"))
    peaked = {k: v * 12.0 if k.startswith("lm_head") else v for k, v in weights.items()}
    threads_before = torch.get_num_threads()
    engine = VLLMEngine(EngineOptions(model=str(tiny_model_dir), dtype="float32", in_process=True,
                                      threads=1))
    try:
        engine.load_weights(peaked)
        first = engine.generate(requests, n=1, temperature=1.0, max_new_tokens=6, seed=5)
        mixed = engine.generate([*(replace(r, continuation=f[0].token_ids, max_new_tokens=10, n=1)
                                   for r, f in zip(requests, first)), *requests],
                                n=3, temperature=1.0, seed=9)
        rest, fresh = mixed[:len(requests)], mixed[len(requests):]
        assert [len(g) for g in rest] == [1] * len(requests)
        assert [len(g) for g in fresh] == [3] * len(requests)
        forced = []
        for request, head, tail in zip(requests, first, rest):
            head, tail = head[0], tail[0]
            assert tail.prompt_token_ids == head.prompt_token_ids  # the prompt as first expanded
            ids = head.prompt_token_ids + head.token_ids + tail.token_ids
            prompt = {"prompt_token_ids": engine.llm.get_tokenizer().encode(request.prompt)
                      + head.token_ids + tail.token_ids}
            if request.images:
                prompt["multi_modal_data"] = {"image": request.images}
            out = engine.llm.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=0),
                                      use_tqdm=False)[0]
            assert out.prompt_token_ids == ids
            start = len(head.prompt_token_ids) + len(head.token_ids)
            forced.append(([out.prompt_logprobs[j][ids[j]].logprob for j in range(start, len(ids))],
                           tail.logprobs))
    finally:
        engine.shutdown()
        torch.set_num_threads(threads_before)
    # peaked: a flat model over 640 tokens would give about -6.5 everywhere
    assert max(lp for _, continued in forced for lp in continued) > -2.0
    for teacher_forced, continued in forced:
        assert continued
        torch.testing.assert_close(torch.tensor(continued), torch.tensor(teacher_forced),
                                   atol=1e-4, rtol=0)

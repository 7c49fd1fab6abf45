"""Rollout throughput: the vLLM rollout engine vs Hugging Face ``generate``, same model, same
prompts (built-in RL prompts, with images), same sampling settings, measured in one run.

    .venv/bin/python bench/rollout.py [--model DIR] [--prompts 16] [--samples 8] [--max-new-tokens 64]

Prints samples/s and generated tokens/s for both, and their ratio.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def hf_generate(model_dir: str, requests, n: int, max_new_tokens: int, temperature: float):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    processor.tokenizer.padding_side = "left"
    tokens = 0
    started = time.perf_counter()
    for request in requests:  # one prompt (its n samples) per call: images differ per prompt
        inputs = processor(text=[request.prompt], images=request.images or None, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=True, temperature=temperature,
                                 num_return_sequences=n, max_new_tokens=max_new_tokens,
                                 pad_token_id=processor.tokenizer.pad_token_id)
        tokens += int((out[:, inputs["input_ids"].shape[1]:] != processor.tokenizer.pad_token_id).sum())
    return time.perf_counter() - started, tokens


def vllm_generate(model_dir: str, requests, n: int, max_new_tokens: int, temperature: float):
    from kimivl_rl.rollout.vllm_engine import EngineOptions, VLLMEngine

    engine = VLLMEngine(EngineOptions(model=model_dir, dtype="float32"))
    engine.generate(requests[:1], n=1, max_new_tokens=4)  # warm-up, not timed
    started = time.perf_counter()
    outputs = engine.generate(requests, n=n, temperature=temperature, max_new_tokens=max_new_tokens, seed=0)
    seconds = time.perf_counter() - started
    engine.shutdown()
    return seconds, sum(len(s.token_ids) for group in outputs for s in group)


def main() -> None:
    from transformers import AutoProcessor

    from kimivl_rl.config import load_config
    from kimivl_rl.controller import load_prompts
    from kimivl_rl.evaluation import generation_requests
    from kimivl_rl.prepare import ensure_data, ensure_model, with_absolute_paths

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    args = parser.parse_args()
    cfg = with_absolute_paths(load_config("configs/tiny.yaml"))
    model_dir = args.model or ensure_model(cfg)
    ensure_data(cfg, progress=False)
    prompts = load_prompts(cfg, cfg.rl.train_file)[: args.prompts]
    requests = generation_requests(prompts, AutoProcessor.from_pretrained(model_dir))
    total = args.prompts * args.samples
    results = {}
    for name, fn in (("hf_generate", hf_generate), ("vllm", vllm_generate)):
        seconds, tokens = fn(model_dir, requests, args.samples, args.max_new_tokens, args.temperature)
        results[name] = (total / seconds, tokens / seconds)
        print(f"{name:12s} {total} samples in {seconds:7.2f}s: {total / seconds:8.1f} samples/s, "
              f"{tokens / seconds:9.1f} tokens/s")
    print(f"vllm / hf_generate: {results['vllm'][0] / results['hf_generate'][0]:.1f}x samples/s, "
          f"{results['vllm'][1] / results['hf_generate'][1]:.1f}x tokens/s "
          f"({Path(model_dir).name}, {args.prompts} prompts x {args.samples}, "
          f"{args.max_new_tokens} new tokens max)")


if __name__ == "__main__":
    main()

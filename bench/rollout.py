"""Rollout throughput: the vLLM rollout engine vs Hugging Face ``generate``, same model, same
prompts (built-in RL prompts, with images), same sampling settings, measured in one run. vLLM
runs twice: in separate engine-core and worker processes (vLLM's default), and in-process (the
CPU default here, ``rollout.in_process``); its start time is measured too.

    .venv/bin/python bench/rollout.py [--model DIR] [--prompts 16] [--samples 8] [--max-new-tokens 64]

Prints samples/s and generated tokens/s of each, their ratios to ``generate``, and the ratio of
the two engines' start times.
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


def vllm_generate(model_dir: str, requests, n: int, max_new_tokens: int, temperature: float,
                  in_process: bool):
    """(generation seconds, generated tokens, engine start seconds)."""
    from kimivl_rl.rollout.vllm_engine import EngineOptions, VLLMEngine

    started = time.perf_counter()
    engine = VLLMEngine(EngineOptions(model=model_dir, dtype="float32", in_process=in_process))
    start_seconds = time.perf_counter() - started
    engine.generate(requests[:1], n=1, max_new_tokens=4)  # warm-up, not timed
    started = time.perf_counter()
    outputs = engine.generate(requests, n=n, temperature=temperature, max_new_tokens=max_new_tokens, seed=0)
    seconds = time.perf_counter() - started
    engine.shutdown()
    return seconds, sum(len(s.token_ids) for group in outputs for s in group), start_seconds


def main() -> None:
    from transformers import AutoProcessor

    from kimivl_rl.config import load_config
    from kimivl_rl.data.rows import RowLoader
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
    prompts = RowLoader.prompts(cfg.data, cfg.rl.train_file)[: args.prompts]
    requests = generation_requests(prompts, AutoProcessor.from_pretrained(model_dir))
    total = args.prompts * args.samples
    # The in-process engine goes first, so it alone pays for importing vLLM in this process.
    runs = {"hf_generate": lambda *a: (*hf_generate(*a), None),
            "vllm, in-process": lambda *a: vllm_generate(*a, in_process=True),
            "vllm, separate processes": lambda *a: vllm_generate(*a, in_process=False)}
    results = {}
    for name, fn in runs.items():
        seconds, tokens, start = fn(model_dir, requests, args.samples, args.max_new_tokens,
                                    args.temperature)
        results[name] = (total / seconds, tokens / seconds, start)
        started = "" if start is None else f" (engine start {start:5.1f}s)"
        print(f"{name:25s} {total} samples in {seconds:7.2f}s: {total / seconds:8.1f} samples/s, "
              f"{tokens / seconds:9.1f} tokens/s{started}")
    baseline = results["hf_generate"]
    for name in ("vllm, separate processes", "vllm, in-process"):
        print(f"{name} / hf_generate: {results[name][0] / baseline[0]:.1f}x samples/s, "
              f"{results[name][1] / baseline[1]:.1f}x tokens/s")
    print(f"engine start, in-process / separate processes: "
          f"{results['vllm, in-process'][2] / results['vllm, separate processes'][2]:.2f}x "
          f"({Path(model_dir).name}, {args.prompts} prompts x {args.samples}, "
          f"{args.max_new_tokens} new tokens max)")


if __name__ == "__main__":
    main()

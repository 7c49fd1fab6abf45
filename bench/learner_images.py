"""The RL learner's update with k responses per image prompt, in one run: each distinct image
encoded once per micro-batch (``shared``, what the learner does: ``encode_trajectories`` gives a
group's responses one image tensor, ``collate_pack`` packs it once) against one encoding per
response (``per response``, the baseline: every trajectory holds its own copy of the image).
Same trajectories, same learner (DeepSpeed, ``rl.micro_batch_tokens``, two updates per
iteration), alternating runs.

    .venv/bin/python bench/learner_images.py [--model DIR] [--prompts 16] [--samples 8] \\
        [--repeats 3] [--threads 1] [KEY=VALUE ...]

Prints seconds per learner iteration and responses per second of each variant (the best of
--repeats), and shared / per response. Runs on the built-in tiny model (the starting model
unless --model names another, e.g. runs/tiny/out/sft_long_cot/model) and the built-in RL
prompts that show an image; responses are seeded random tokens of 40-140 tokens.
"""
from __future__ import annotations

import argparse
import random
import socket
import time

TIMED = ("per response", "shared")


def trajectories(prompts, processor, samples: int, seed: int):
    """``samples`` responses to each prompt (seeded random tokens), sharing the prompt's images."""
    from kimivl_rl.evaluation import generation_requests
    from kimivl_rl.rl.experience import Trajectory

    rng = random.Random(seed)
    vocab = processor.tokenizer.vocab_size  # the tiny tokenizer's size follows its corpus
    out = []
    for index, (prompt, request) in enumerate(zip(prompts, generation_requests(prompts, processor))):
        ids = processor(text=[request.prompt], images=prompt.images, return_tensors="pt")["input_ids"][0].tolist()
        for k in range(samples):
            length = rng.randint(40, 140)
            out.append(Trajectory(index, ids, [rng.randrange(10, vocab) for _ in range(length)],
                                  [-1.0] * length, "stop", prompt.images, reward=float(k % 2)))
    return out


def with_own_images(batch):
    """The baseline: every response holds a copy of its prompt's images."""
    from dataclasses import replace

    return [replace(t, images=[image.copy() for image in t.images]) for t in batch]


def main() -> None:
    from kimivl_rl.config import config_to_dict, load_config
    from kimivl_rl.data.rows import RowLoader
    from kimivl_rl.prepare import ensure_data, ensure_model, with_absolute_paths
    from kimivl_rl.system.learner import LearnerWorker

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = with_absolute_paths(load_config("configs/tiny.yaml", [
        f"cluster.learner_threads={args.threads}", *args.overrides]))
    model_dir = args.model or ensure_model(cfg)
    ensure_data(cfg, progress=False)
    learner = LearnerWorker(config_to_dict(cfg), str(model_dir), 0, 1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    learner.init_group("127.0.0.1", port)
    prompts = [p for p in RowLoader.prompts(cfg.data, cfg.rl.train_file) if p.images][: args.prompts]
    shared = trajectories(prompts, learner.processor, args.samples, cfg.seed)
    batches = {"per response": with_own_images(shared), "shared": shared}
    learner.learn(shared[: args.samples])  # warm-up
    seconds = {name: [] for name in TIMED}
    for _ in range(args.repeats):
        for name in TIMED:
            started = time.perf_counter()
            learner.learn(batches[name])
            seconds[name].append(time.perf_counter() - started)
    for name in TIMED:
        best = min(seconds[name])
        print(f"{name:14s} {best:7.3f} s per iteration, {len(shared) / best:7.1f} responses/s "
              f"(runs: {', '.join(f'{s:.3f}' for s in seconds[name])})")
    print(f"shared / per response: {min(seconds['per response']) / min(seconds['shared']):.2f}x "
          f"responses/s ({len(prompts)} image prompts x {args.samples} responses, "
          f"{args.threads} thread(s))")


if __name__ == "__main__":
    main()

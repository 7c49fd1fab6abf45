"""Difficulty labels for RL prompts: each prompt's pass rate over several samples.

The recipe labels difficulty by sampling the SFT model several times (the paper: 10) at a
relatively high temperature; the sampler's curriculum and priorities start from these rates.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from tqdm import tqdm

from kimivl_rl.config import Config

log = logging.getLogger(__name__)
CHUNK = 64  # prompts per generate call: progress output and bounded memory


def label_difficulty(cfg: Config, model_path: str, in_file: Path, out_file: Path) -> dict:
    """Write ``in_file``'s rows to ``out_file`` with ``pass_rate`` set; return statistics."""
    from transformers import AutoProcessor

    from kimivl_rl.controller import RLActors, generate, load_prompts, score
    from kimivl_rl.evaluation import generation_requests
    from kimivl_rl.ray_runtime import init_ray

    if out_file.resolve().parent != in_file.resolve().parent:
        raise ValueError(f"{out_file}: write labels next to {in_file} (image paths are relative "
                         f"to the data file's directory)")
    prompts = load_prompts(cfg, str(in_file.resolve()))  # an absolute path ignores data.dir
    processor = AutoProcessor.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    init_ray(cfg)
    actors = RLActors.start(cfg, model_path, with_learners=False)
    rates: list[float] = []
    try:
        for start in tqdm(range(0, len(prompts), CHUNK), desc="labelling", unit="chunk"):
            chunk = prompts[start:start + CHUNK]
            samples = generate(actors, cfg, generation_requests(chunk, processor), cfg.sampler.label_samples,
                               cfg.sampler.label_temperature, seed=cfg.seed + start)
            scores = score(actors, cfg, chunk, samples)
            k = cfg.sampler.label_samples
            rates += [sum(s.score for s in scores[i * k:(i + 1) * k]) / k for i in range(len(chunk))]
    finally:
        actors.stop()
    rows = [json.loads(line) for line in in_file.read_text().splitlines() if line.strip()]
    with open(out_file, "w") as f:
        for row, rate in zip(rows, rates):
            f.write(json.dumps({**row, "pass_rate": rate}) + "\n")
    stats = {"prompts": len(rates), "samples_per_prompt": cfg.sampler.label_samples,
             "mean_pass_rate": sum(rates) / max(1, len(rates)),
             "always_solved": sum(r == 1.0 for r in rates), "never_solved": sum(r == 0.0 for r in rates)}
    log.info("difficulty labels written to %s: %s", out_file, stats)
    return stats

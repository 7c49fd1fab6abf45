"""Rollouts overlapped with learning, and partial rollouts, measured: RL from one checkpoint
in five modes, the same config otherwise, in one run:

- ``sync``: ``rl.max_staleness=0`` (generate, score, learn, sync in turn);
- ``async``: ``rl.max_staleness=1`` (the next iteration's groups collected while the learner trains);
- ``tail`` and ``tail+partial``: a long-tailed length distribution, without and with partial
  rollouts (``rollout.token_budget=--token-budget``). The RL prompts get a share
  (``--tail-share``) of additions of ten-digit numbers, far outside the tiny model's training;
  on some samples it answers them with digits up to ``rollout.max_new_tokens=--tail-max-tokens``
  while the rest stop after about 100 tokens. Uniform prompt sampling keeps the share fixed,
  ``rl.max_staleness`` leaves room for a response to be carried to the limit.
- ``tail+partial+repeats``: as ``tail+partial``, with repeat detection (``rollout.stop_repeats=3``:
  a response whose segment ends in one n-gram three times over is ended there, k1.5's rule).

``--sampling-rounds N`` sets ``rl.dynamic_sampling_rounds`` in every mode (0: one round of
prompts per iteration, so that iterations generate equal amounts whatever the rewards).

Prints per mode the wall time per iteration (also without the first), finished samples per
second, the learner's and rollouts' idle shares, seconds per sampling round and per trained
response, generated tokens per second of collection, mean staleness and the share of groups
finished from carried responses, then the async/sync and partial/whole ratios, and the
async/sync ratio that perfect overlap of the sync run's own phase times would give
(``overlap_bound``). On 2 CPUs give learner and rollout a core each so the overlap is real:

    .venv/bin/python bench/rl_async.py --model runs/tiny/out/sft_long_cot/model \\
        [--config configs/tiny.yaml] [--iterations 12] [--modes sync,async,tail,tail+partial,tail+partial+repeats] \\
        cluster.learner_threads=1 cluster.rollout_threads=1 [KEY=VALUE ...]

The rollout and learner processes use ``cluster.malloc``'s allocator (auto: tcmalloc where
installed; it prints which); ``cluster.malloc=system`` measures glibc's instead.

Each mode writes to <output.dir>/bench_async/<mode>/ (the long-tailed prompts to
<output.dir>/bench_async/long_tail/); a finished mode is not run again.
Iteration times leave out held-out evaluation and checkpoints.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import shutil
from pathlib import Path

from kimivl_rl.config import load_config
from kimivl_rl.infra.allocator import preload_library
from kimivl_rl.infra.layout import OutputLayout
from kimivl_rl.infra.metrics import read_jsonl
from kimivl_rl.prepare import ensure_data, with_absolute_paths
from kimivl_rl.system.controller import run_rl


def iteration_figures(cfg) -> dict:
    """Means over the run's iterations: seconds, samples per second, idle shares, and the unit
    costs of both sides (seconds per sampling round, per trained response, generated tokens per
    second of collection), which show how much rollout and learner slow each other when they
    run at once."""
    trains = training_rows(cfg)
    seconds = sum(r["time_iteration_s"] for r in trains)
    return {"s_per_iter": seconds / len(trains),
            # the first iteration of rl.max_staleness=1 collects alone: the pipeline filling
            "s_per_iter_2+": (seconds - trains[0]["time_iteration_s"]) / max(1, len(trains) - 1),
            "samples_per_s": sum(len(r["sampled_prompts"]) for r in trains)
            * cfg.rl.samples_per_prompt / seconds,
            "learner_idle": sum(r["learner_idle_s"] for r in trains) / seconds,
            "rollout_idle": sum(r["rollout_idle_s"] for r in trains) / seconds,
            "s_per_round": sum(r["time_generate_s"] for r in trains)
            / sum(r["sampling_rounds"] for r in trains),
            "s_per_response": sum(r["time_learn_s"] for r in trains)
            / max(1, sum(r["learner_responses"] for r in trains)),
            # unlike s_per_round, whatever the responses' lengths (with partial rollouts a carried
            # response's tokens count in the iteration it finishes)
            "gen_tokens_per_s": sum(r["generated_tokens_per_s"] * r["time_generate_s"] for r in trains)
            / sum(r["time_generate_s"] for r in trains),
            "staleness": sum(r["staleness_mean"] for r in trains) / len(trains),
            "partial_share": sum(r["partial_groups"] for r in trains)
            / max(1, sum(len(r["sampled_prompts"]) for r in trains)),
            "repeat_share": sum(r["repeat_fraction"] for r in trains) / len(trains)}


def training_rows(cfg) -> list[dict]:
    return [r for r in read_jsonl(OutputLayout.of(cfg).metrics("rl")) if "time_iteration_s" in r]


def overlap_bound(cfg) -> float:
    """The wall time ``rl.max_staleness=1`` would take for this synchronous run's work on cores
    that do not slow each other, over the time it took: the first collection alone, then each
    update overlapped with the next iteration's collection, then the weight sync."""
    trains = training_rows(cfg)
    collect = [r["time_generate_s"] + r["time_reward_s"] for r in trains] + [0.0]
    ideal = collect[0] + sum(max(collect[i + 1], r["time_learn_s"]) + r["time_sync_s"]
                             for i, r in enumerate(trains))
    return ideal / sum(r["time_iteration_s"] for r in trains)


def long_tail_prompts(cfg, share: float, directory: Path) -> Path:
    """The RL training prompts with ``share`` of them replaced by additions of two ten-digit
    numbers (seeded), written with the prompts' images under ``directory``; the file's path."""
    source = Path(cfg.data.dir) / cfg.rl.train_file
    rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    rng = random.Random(cfg.seed)
    for i in rng.sample(range(len(rows)), round(share * len(rows))):
        a, b = rng.randrange(10**9, 10**10), rng.randrange(10**9, 10**10)
        rows[i] = {"messages": [{"role": "user", "content": f"What is {a} + {b}?"}], "images": [],
                   "answer": str(a + b), "difficulty": 3, "task": "arith"}
    directory.mkdir(parents=True, exist_ok=True)
    if not (directory / "images").is_dir():
        shutil.copytree(source.parent / "images", directory / "images")
    target = directory / "train.jsonl"
    target.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return target


def mode_overrides(mode: str, args, tail_file: Path) -> list[str]:
    tail = [f"rl.train_file={tail_file}", "sampler.mode=uniform",
            f"rollout.max_new_tokens={args.tail_max_tokens}",
            # a response may need ceil(limit / budget) segments, one iteration each
            f"rl.max_staleness={math.ceil(args.tail_max_tokens / args.token_budget) + 1}"]
    return {"sync": ["rl.max_staleness=0"], "async": ["rl.max_staleness=1"], "tail": tail,
            "tail+partial": [*tail, f"rollout.token_budget={args.token_budget}"],
            "tail+partial+repeats": [*tail, f"rollout.token_budget={args.token_budget}",
                                     "rollout.stop_repeats=3"]}[mode]


RATIO_COLUMNS = 8  # time and rates; the rest are shares
RATIOS = (("async", "sync"), ("tail+partial", "tail"), ("tail+partial+repeats", "tail+partial"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--modes", default="sync,async,tail,tail+partial,tail+partial+repeats")
    parser.add_argument("--sampling-rounds", type=int, default=None)
    parser.add_argument("--tail-share", type=float, default=0.2)
    parser.add_argument("--tail-max-tokens", type=int, default=1024)
    parser.add_argument("--token-budget", type=int, default=256)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    base = with_absolute_paths(load_config(args.config, args.overrides))
    print(f"allocator of rollout and learner (cluster.malloc={base.cluster.malloc}): "
          f"{preload_library(base.cluster.malloc) or 'the system malloc'}")
    ensure_data(base, progress=False)
    model = str(Path(args.model).resolve())
    tail_file = long_tail_prompts(base, args.tail_share, Path(base.output.dir) / "bench_async" / "long_tail")
    rows, configs = {}, {}
    for mode in args.modes.split(","):
        out = Path(base.output.dir) / "bench_async" / mode
        cfg = with_absolute_paths(load_config(args.config, [
            *args.overrides, f"output.dir={out}", f"rl.iterations={args.iterations}",
            f"rl.eval_every={args.iterations}",
            *([] if args.sampling_rounds is None else [f"rl.dynamic_sampling_rounds={args.sampling_rounds}"]),
            *mode_overrides(mode, args, tail_file)]))
        run_rl(cfg, model)
        rows[mode], configs[mode] = iteration_figures(cfg), cfg
    keys = list(next(iter(rows.values())))
    ratios = [(new, old) for new, old in RATIOS if new in rows and old in rows]
    width = max(len(label) for label in [*rows, *(f"{new}/{old}" for new, old in ratios)]) + 2
    column = max(len(k) for k in keys) + 2
    print(f"\n{'mode':<{width}}" + "".join(f"{k:>{column}}" for k in keys))
    for mode, row in rows.items():
        print(f"{mode:<{width}}" + "".join(f"{row[k]:>{column}.3f}" for k in keys))
    for new, old in ratios:
        print(f"{new + '/' + old:<{width}}" + "".join(
            f"{rows[new][k] / max(1e-9, rows[old][k]):>{column}.3f}" for k in keys[:RATIO_COLUMNS]))
    if "sync" in rows:
        print(f"\nasync/sync bound for the sync run's phase times on independent cores: "
              f"{overlap_bound(configs['sync']):.3f}")


if __name__ == "__main__":
    main()

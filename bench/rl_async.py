"""Rollouts overlapped with learning, and partial rollouts, measured: RL from one checkpoint
in four modes, the same config otherwise, in one run:

- ``sync``: ``rl.max_staleness=0`` (generate, score, learn, sync in turn);
- ``async``: ``rl.max_staleness=1`` (the next iteration's groups collected while the learner trains);
- ``tail`` and ``tail+partial``: a long-tailed length distribution (``--tail-temperature``:
  some responses ramble to ``rollout.max_new_tokens``), ``rl.max_staleness=2``, without and with
  partial rollouts (``rollout.token_budget=--token-budget``).

Prints per mode the wall time per iteration, finished samples per second, the learner's and
rollouts' idle shares, mean staleness and the share of groups finished from carried responses,
then the async/sync and partial/whole ratios. On 2 CPUs give learner and rollout a core each so
the overlap is real:

    .venv/bin/python bench/rl_async.py --model runs/tiny/out/sft_long_cot/model \\
        [--config configs/tiny.yaml] [--iterations 6] [--modes sync,async,tail,tail+partial] \\
        cluster.learner_threads=1 cluster.rollout_threads=1 [KEY=VALUE ...]

Each mode writes to <output.dir>/bench_async/<mode>/; a finished mode is not run again.
Iteration times leave out held-out evaluation and checkpoints.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from kimivl_rl.config import load_config
from kimivl_rl.infra.layout import OutputLayout
from kimivl_rl.infra.metrics import read_jsonl
from kimivl_rl.prepare import ensure_data, with_absolute_paths
from kimivl_rl.system.controller import run_rl


def iteration_figures(cfg) -> dict:
    """Means over the run's iterations: seconds, samples per second, idle shares."""
    trains = [r for r in read_jsonl(OutputLayout.of(cfg).metrics("rl")) if "time_iteration_s" in r]
    seconds = sum(r["time_iteration_s"] for r in trains)
    return {"s_per_iter": seconds / len(trains),
            "samples_per_s": sum(len(r["sampled_prompts"]) for r in trains)
            * cfg.rl.samples_per_prompt / seconds,
            "learner_idle": sum(r["learner_idle_s"] for r in trains) / seconds,
            "rollout_idle": sum(r["rollout_idle_s"] for r in trains) / seconds,
            "staleness": sum(r["staleness_mean"] for r in trains) / len(trains),
            "partial_share": sum(r["partial_groups"] for r in trains)
            / max(1, sum(len(r["sampled_prompts"]) for r in trains))}


def mode_overrides(mode: str, tail_temperature: float, token_budget: int) -> list[str]:
    tail = ["rl.max_staleness=2", f"rollout.temperature={tail_temperature}"]
    return {"sync": ["rl.max_staleness=0"], "async": ["rl.max_staleness=1"], "tail": tail,
            "tail+partial": [*tail, f"rollout.token_budget={token_budget}"]}[mode]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--modes", default="sync,async,tail,tail+partial")
    parser.add_argument("--tail-temperature", type=float, default=1.3)
    parser.add_argument("--token-budget", type=int, default=96)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    base = with_absolute_paths(load_config(args.config, args.overrides))
    ensure_data(base, progress=False)
    model = str(Path(args.model).resolve())
    rows = {}
    for mode in args.modes.split(","):
        out = Path(base.output.dir) / "bench_async" / mode
        cfg = with_absolute_paths(load_config(args.config, [
            *args.overrides, f"output.dir={out}", f"rl.iterations={args.iterations}",
            f"rl.eval_every={args.iterations}",
            *mode_overrides(mode, args.tail_temperature, args.token_budget)]))
        run_rl(cfg, model)
        rows[mode] = iteration_figures(cfg)
    keys = list(next(iter(rows.values())))
    print(f"\n{'mode':<14}" + "".join(f"{k:>14}" for k in keys))
    for mode, row in rows.items():
        print(f"{mode:<14}" + "".join(f"{row[k]:>14.3f}" for k in keys))
    for new, old in (("async", "sync"), ("tail+partial", "tail")):
        if new in rows and old in rows:
            print(f"{new + '/' + old:<14}" + "".join(f"{rows[new][k] / max(1e-9, rows[old][k]):>14.3f}"
                                                    for k in keys[:4]))


if __name__ == "__main__":
    main()

"""Rollouts overlapped with learning, measured: RL from one checkpoint synchronously
(``rl.max_staleness=0``) and collecting one iteration ahead (``rl.max_staleness=1``), the same
config otherwise, in one run. Prints per mode the wall time per iteration, samples per second and
the learner's and rollouts' idle shares (time each waited for the other, of the iteration), and
the async/sync ratios. On 2 CPUs give learner and rollout a core each so the overlap is real:

    .venv/bin/python bench/rl_async.py --model runs/tiny/out/sft_long_cot/model \\
        [--config configs/tiny.yaml] [--iterations 6] \\
        cluster.learner_threads=1 cluster.rollout_threads=1 [KEY=VALUE ...]

Each mode writes to <output.dir>/bench_async/staleness_<n>/; a finished mode is not run again.
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
            "staleness": sum(r["staleness_mean"] for r in trains) / len(trains)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    base = with_absolute_paths(load_config(args.config, args.overrides))
    ensure_data(base, progress=False)
    model = str(Path(args.model).resolve())
    rows = {}
    for staleness in (0, 1):
        out = Path(base.output.dir) / "bench_async" / f"staleness_{staleness}"
        cfg = with_absolute_paths(load_config(args.config, [
            *args.overrides, f"output.dir={out}", f"rl.iterations={args.iterations}",
            f"rl.max_staleness={staleness}", f"rl.eval_every={args.iterations}"]))
        run_rl(cfg, model)
        rows[staleness] = iteration_figures(cfg)
    keys = list(rows[0])
    print(f"\n{'max_staleness':<14}" + "".join(f"{k:>14}" for k in keys))
    for staleness, row in rows.items():
        print(f"{staleness:<14}" + "".join(f"{row[k]:>14.3f}" for k in keys))
    print(f"{'async/sync':<14}" + "".join(f"{rows[1][k] / max(1e-9, rows[0][k]):>14.3f}"
                                         for k in keys[:-1]))


if __name__ == "__main__":
    main()

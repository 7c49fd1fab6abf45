"""Difficulty control, measured: RL from one checkpoint once per sampler mode (and with dynamic
sampling), the same config otherwise, in one run. Prints, per mode, the mean informative-group
fraction (groups whose rewards differ, of all groups sampled), the informative groups each update
trains on, iterations without an update, and held-out greedy accuracy (all prompts and the tier) before and after, with standard errors.

    .venv/bin/python bench/rl_sampler_modes.py --model runs/tiny/out/sft_long_cot/model \\
        [--config configs/tiny.yaml] [--modes prioritized,informative,informative+dynamic] \\
        [KEY=VALUE ...]

Each mode writes to <output.dir>/bench_sampler/<mode>/; a finished mode is not run again.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from kimivl_rl.config import load_config
from kimivl_rl.infra.layout import OutputLayout
from kimivl_rl.infra.metrics import read_jsonl
from kimivl_rl.prepare import ensure_data, with_absolute_paths
from kimivl_rl.system.controller import run_rl

DYNAMIC = "+dynamic"


def mode_overrides(mode: str, rounds: int) -> list[str]:
    """``informative+dynamic`` -> sampler.mode=informative with dynamic sampling on."""
    base = mode.removesuffix(DYNAMIC)
    return [f"sampler.mode={base}", f"rl.dynamic_sampling_rounds={rounds if mode.endswith(DYNAMIC) else 0}"]


def groups_per_update(cfg) -> float:
    """Mean number of prompt groups the learner trained on per iteration."""
    trains = [r for r in read_jsonl(OutputLayout.of(cfg).metrics("rl")) if "learner_responses" in r]
    return sum(r["learner_responses"] for r in trains) / max(1, len(trains)) / cfg.rl.samples_per_prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--modes", default="prioritized,informative,informative+dynamic")
    parser.add_argument("--rounds", type=int, default=2, help="dynamic_sampling_rounds for +dynamic")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    base = with_absolute_paths(load_config(args.config, args.overrides))
    ensure_data(base, progress=False)
    model = str(Path(args.model).resolve())
    rows = []
    for mode in args.modes.split(","):
        out = Path(base.output.dir) / "bench_sampler" / mode
        cfg = with_absolute_paths(load_config(args.config, [*args.overrides, f"output.dir={out}",
                                                            *mode_overrides(mode, args.rounds)]))
        rows.append((mode, run_rl(cfg, model), groups_per_update(cfg)))
    print(f"\n{'mode':<22} {'informative':>11} {'groups/update':>13} {'no update':>9} "
          f"{'held-out all':>22} {'held-out tier':>22}")
    for mode, s, groups in rows:
        first, last = s["eval_start"], s["eval_end"]
        print(f"{mode:<22} {s['informative_group_fraction_mean']:>11.2f} {groups:>13.1f} "
              f"{s['iterations_without_update']:>9d} "
              f"{first['eval_reward']:>9.3f} -> {last['eval_reward']:.3f}±{last['eval_reward_se']:.3f} "
              f"{first['eval_tier_reward']:>9.3f} -> {last['eval_tier_reward']:.3f}"
              f"±{last['eval_tier_reward_se']:.3f}")


if __name__ == "__main__":
    main()

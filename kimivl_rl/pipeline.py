"""The whole recipe in one command: joint SFT -> long-CoT SFT -> RL (``kimivl-rl run``).

Each stage starts from the previous stage's output. A finished stage (its ``summary.json``
exists) is not run again, and an interrupted one continues from its last checkpoint, so
rerunning the same command after a stop picks up where the run died. At the end the run writes
``summary.json``, prints held-out accuracy per stage and difficulty level and RL's gain on its
tier (``summary.format_summary``), and draws the plots (where everything goes:
``kimivl_rl/infra/layout.py``).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from kimivl_rl.config import Config, dump_config
from kimivl_rl.infra.layout import OutputLayout
from kimivl_rl.infra.metrics import read_jsonl
from kimivl_rl.summary import STAGE_TITLES, run_summary

log = logging.getLogger(__name__)
STAGES = ("joint", "long_cot", "rl")


def parse_stages(text: str) -> list[str]:
    """``"joint,rl"`` -> ``["joint", "rl"]``, always in pipeline order."""
    asked = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in asked if s not in STAGES]
    if unknown or not asked:
        raise ValueError(f"--stages takes a comma-separated subset of {','.join(STAGES)}; "
                         f"got {text!r}")
    return [s for s in STAGES if s in asked]


def run_pipeline(cfg: Config, stages: tuple[str, ...] | list[str] = STAGES) -> dict:
    """Run (or continue) the given stages in order; return the run's summary."""
    from kimivl_rl.prepare import checked_config, ensure_data, ensure_model
    from kimivl_rl.system.controller import rl_input_model, run_rl
    from kimivl_rl.sft.trainer import run_stage

    base_model = ensure_model(cfg)
    ensure_data(cfg)
    # Every stage's data is checked before the first stage starts, and before anything is
    # written to the output directory: a bad row fails the run in seconds, not after SFT.
    cfg = checked_config(cfg, stages)
    layout = OutputLayout.of(cfg)
    layout.root.mkdir(parents=True, exist_ok=True)
    layout.config.write_text(dump_config(cfg))
    for number, stage in enumerate(stages, 1):
        log.info("=== stage %d/%d: %s ===", number, len(stages), STAGE_TITLES[stage])
        if stage == "rl":
            run_rl(cfg, rl_input_model(cfg, base_model))
        else:
            run_stage(cfg, stage, base_model, check=False)
    summary = run_summary(cfg)
    layout.summary.write_text(json.dumps(summary, indent=1))
    summary["plots"] = [str(p) for p in write_plots(cfg)]
    return summary


# ----------------------------------------------------------------------------- plots

def write_plots(cfg: Config) -> list[Path]:
    """PNG plots of the stages that have metrics: SFT loss curves; RL reward, held-out accuracy
    and response length per iteration, with the iteration where the length penalty turns on."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    layout, written = OutputLayout.of(cfg), []
    layout.plots.mkdir(parents=True, exist_ok=True)
    sft = {stage: read_jsonl(layout.metrics(stage)) for stage in ("joint", "long_cot")}
    if any(sft.values()):
        fig, ax = plt.subplots(figsize=(7, 4))
        for stage, records in sft.items():
            if records:
                ax.plot([r["step"] for r in records], [r["loss"] for r in records],
                        label=STAGE_TITLES[stage])
        ax.set(xlabel="optimizer step", ylabel="answer-token loss", yscale="log",
               title="SFT loss")
        ax.legend()
        written.append(_save(fig, layout.plots / "sft_loss.png"))
    rl = read_jsonl(layout.metrics("rl"))
    if rl:
        written.append(_save(_rl_figure(plt, rl), layout.plots / "rl.png"))
    return written


def _rl_figure(plt, records: list[dict]):
    """Reward and pass rate, held-out accuracy on a fixed 0-1 axis with standard-error bars (all
    prompts and the tier), and response length; the length penalty's start marked."""
    train = [r for r in records if "reward_mean" in r]
    evals = [r for r in records if "eval_reward" in r]
    penalty_on = next((r["step"] for r in train if r.get("length_penalty_weight", 0) > 0), None)
    fig, axes = plt.subplots(3, 1, figsize=(7, 9), sharex=True)
    for label, key in (("training reward (with length penalty)", "reward_mean"),
                       ("training pass rate", "pass_rate"),
                       ("informative groups", "informative_group_fraction")):
        axes[0].plot([r["step"] for r in train], [r[key] for r in train], marker=".", label=label)
    shown = [("held-out, all prompts", "eval_reward")]
    if any(r.get("eval_tier_n") for r in evals):  # a tier the rule left empty has no curve
        shown.append(("held-out, tier", "eval_tier_reward"))
    for label, key in shown:
        axes[1].errorbar([r["step"] for r in evals], [r.get(key, 0.0) for r in evals],
                         yerr=[r.get(f"{key}_se", 0.0) for r in evals], marker="o", capsize=3,
                         label=f"{label} (greedy, ±1 SE)")
    axes[1].set_ylim(0, 1)
    axes[2].plot([r["step"] for r in train], [r["response_length_mean"] for r in train],
                 marker=".", label="training samples")
    axes[2].plot([r["step"] for r in evals], [r["eval_response_length"] for r in evals],
                 marker="o", label="held-out (greedy)")
    axes[2].set_ylim(bottom=0)
    for ax, ylabel in zip(axes, ("reward", "accuracy", "response tokens")):
        if penalty_on is not None:
            ax.axvline(penalty_on, color="grey", linestyle="--",
                       label=f"length penalty on (iteration {penalty_on})")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    axes[-1].set_xlabel("RL iteration (0 = before training)")
    fig.suptitle("RL")
    return fig


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path

"""The whole recipe in one command: joint SFT -> long-CoT SFT -> RL (``kimivl-rl run``).

Each stage starts from the previous stage's output. A finished stage (its ``summary.json``
exists) is not run again, and an interrupted one continues from its last checkpoint, so
rerunning the same command after a stop picks up where the run died. At the end the run writes
``summary.json``, prints a table of held-out accuracy per stage, and draws the plots.

Output directory (``output.dir``)::

    config.yaml                  the resolved config of the last run
    sft_joint/, sft_long_cot/    model/ (HF checkpoint), metrics.jsonl, summary.json, ray_train/
    rl/                          model/, checkpoints/iter_N/, metrics.jsonl, summary.json
    tensorboard/                 one run per stage
    plots/                       sft_loss.png, rl.png
    summary.json                 the table below, as JSON
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

from kimivl_rl.config import Config, dump_config
from kimivl_rl.metrics import read_jsonl

log = logging.getLogger(__name__)
STAGES = ("joint", "long_cot", "rl")
STAGE_TITLES = {"joint": "joint SFT", "long_cot": "long-CoT SFT", "rl": "RL"}


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
    from kimivl_rl.controller import rl_input_model, run_rl
    from kimivl_rl.prepare import check_data, ensure_data, ensure_model
    from sft.trainer import run_stage

    base_model = ensure_model(cfg)
    ensure_data(cfg)
    # Every stage's data is checked before the first stage starts, and before anything is
    # written to the output directory: a bad row fails the run in seconds, not after SFT.
    check_data(cfg, stages)
    out = Path(cfg.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_config(cfg))
    for number, stage in enumerate(stages, 1):
        log.info("=== stage %d/%d: %s ===", number, len(stages), STAGE_TITLES[stage])
        if stage == "rl":
            run_rl(cfg, rl_input_model(cfg, base_model))
        else:
            run_stage(cfg, stage, base_model, check=False)
    summary = run_summary(cfg)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    summary["plots"] = [str(p) for p in write_plots(cfg, out / "plots")]
    return summary


# ----------------------------------------------------------------------------- summary

def _read_json(path: Path) -> Optional[dict]:
    return json.loads(path.read_text()) if path.is_file() else None


def run_summary(cfg: Config) -> dict:
    """Held-out accuracy and mean response length after each finished stage, and RL's reward at
    its start and end. Stages that have not run are left out."""
    out = Path(cfg.output.dir)
    rows = []
    for stage in ("joint", "long_cot"):
        finished = _read_json(out / f"sft_{stage}" / "summary.json")
        if finished:
            ev = finished["eval"]
            rows.append({"stage": STAGE_TITLES[stage], "accuracy": ev["accuracy"],
                         "response_tokens": ev["mean_response_tokens"],
                         "trace_format": ev["trace_format_rate"]})
    summary = {"stages": rows}
    if _read_json(out / "rl" / "summary.json"):
        records = read_jsonl(out / "rl" / "metrics.jsonl")
        evals = [r for r in records if "eval_reward" in r]
        trains = [r for r in records if "reward_mean" in r]
        rows.append({"stage": "RL", "accuracy": evals[-1]["eval_reward"],
                     "response_tokens": evals[-1]["eval_response_length"], "trace_format": None})
        summary["rl"] = {"eval_reward_start": evals[0]["eval_reward"],
                         "eval_reward_end": evals[-1]["eval_reward"],
                         "train_reward_start": trains[0]["reward_mean"],
                         "train_reward_end": trains[-1]["reward_mean"],
                         "iterations": trains[-1]["step"]}
    return summary


def format_summary(summary: dict) -> str:
    lines = [f"{'stage':<14} {'held-out acc':>12} {'resp. tokens':>12} {'trace format':>12}"]
    for row in summary["stages"]:
        trace = "-" if row["trace_format"] is None else f"{row['trace_format']:.2f}"
        lines.append(f"{row['stage']:<14} {row['accuracy']:>12.3f} "
                     f"{row['response_tokens']:>12.1f} {trace:>12}")
    rl = summary.get("rl")
    if rl:
        lines.append(f"RL reward over {rl['iterations']} iterations: held-out "
                     f"{rl['eval_reward_start']:.3f} -> {rl['eval_reward_end']:.3f}, training "
                     f"{rl['train_reward_start']:.3f} -> {rl['train_reward_end']:.3f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots

def write_plots(cfg: Config, directory: Path) -> list[Path]:
    """PNG plots of the stages that have metrics: SFT loss curves; RL reward, held-out accuracy
    and response length per iteration, with the iteration where the length penalty turns on."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    out, written = Path(cfg.output.dir), []
    sft = {stage: read_jsonl(out / f"sft_{stage}" / "metrics.jsonl") for stage in ("joint", "long_cot")}
    if any(sft.values()):
        fig, ax = plt.subplots(figsize=(7, 4))
        for stage, records in sft.items():
            if records:
                ax.plot([r["step"] for r in records], [r["loss"] for r in records],
                        label=STAGE_TITLES[stage])
        ax.set(xlabel="optimizer step", ylabel="answer-token loss", yscale="log",
               title="SFT loss")
        ax.legend()
        written.append(_save(fig, directory / "sft_loss.png"))
    rl = read_jsonl(out / "rl" / "metrics.jsonl")
    if rl:
        written.append(_save(_rl_figure(plt, rl), directory / "rl.png"))
    return written


def _rl_figure(plt, records: list[dict]):
    train = [r for r in records if "reward_mean" in r]
    evals = [r for r in records if "eval_reward" in r]
    penalty_on = next((r["step"] for r in train if r.get("length_penalty_weight", 0) > 0), None)
    fig, axes = plt.subplots(3, 1, figsize=(7, 9), sharex=True)
    panels = [
        (axes[0], "reward", [("training reward (with length penalty)", train, "reward_mean"),
                             ("training pass rate", train, "pass_rate")]),
        (axes[1], "held-out accuracy", [("held-out accuracy (greedy)", evals, "eval_reward")]),
        (axes[2], "response tokens", [("mean response length", train, "response_length_mean")]),
    ]
    for ax, ylabel, series in panels:
        for label, rows, key in series:
            ax.plot([r["step"] for r in rows], [r[key] for r in rows], marker="o", label=label)
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

"""Every path under ``output.dir``; the rest of kimivl-rl asks here instead of joining names.

    config.yaml                  the resolved config of the last run
    summary.json                 the run's table of held-out accuracy per stage
    sft_joint/, sft_long_cot/    model/ (HF checkpoint), metrics.jsonl, summary.json, ray_train/,
                                 solved_rows.json
    rl/                          model/, checkpoints/iter_N/ (``CheckpointFiles``), metrics.jsonl,
                                 summary.json
    tensorboard/<stage dir>/     one run per stage
    plots/                       sft_loss.png, rl.png
    eval/<model>.json            ``kimivl-rl eval`` reports

It imports nothing of kimivl-rl, so the controller, the pipeline and ``sft/`` can all use it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# A stage's directory name, also its TensorBoard run's.
STAGE_DIRS = {"joint": "sft_joint", "long_cot": "sft_long_cot", "rl": "rl"}


@dataclass(frozen=True)
class OutputLayout:
    root: Path

    @classmethod
    def of(cls, cfg) -> OutputLayout:
        """The layout of ``cfg.output.dir``, made absolute (Ray Train wants absolute storage)."""
        return cls(Path(cfg.output.dir).resolve())

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    def eval_report(self, model: str) -> Path:
        """``eval/<model dir name>.json``; a stage's output (``<stage dir>/model``) is named by
        its stage directory, so the stages' reports sit side by side."""
        path = Path(model)
        return self.root / "eval" / f"{path.parent.name if path.name == 'model' else path.name}.json"

    def stage(self, stage: str) -> Path:
        return self.root / STAGE_DIRS[stage]

    def model(self, stage: str) -> Path:
        return self.stage(stage) / "model"

    def metrics(self, stage: str) -> Path:
        return self.stage(stage) / "metrics.jsonl"

    def stage_summary(self, stage: str) -> Path:
        return self.stage(stage) / "summary.json"

    def solved_rows(self, stage: str) -> Path:
        """Which of an SFT stage's own rows it trains on (``sft.<stage>.keep_solved``)."""
        return self.stage(stage) / "solved_rows.json"

    def ray_train(self, stage: str) -> Path:
        return self.stage(stage) / "ray_train"

    def ray_train_run(self, stage: str) -> Path:
        """Ray Train's run directory: its checkpoints and ``checkpoint_manager_snapshot.json``."""
        return self.ray_train(stage) / STAGE_DIRS[stage]

    def tensorboard(self, stage: str) -> Path:
        return self.root / "tensorboard" / STAGE_DIRS[stage]

    @property
    def rl_checkpoints(self) -> Path:
        return self.stage("rl") / "checkpoints"

    def rl_checkpoint(self, iteration: int) -> Path:
        return self.rl_checkpoints / f"iter_{iteration:06d}"

    def rl_checkpoint_dirs(self) -> list[Path]:
        """The directories named as ``rl_checkpoint`` names them, oldest first (anything else
        under ``rl_checkpoints`` is not ours)."""
        return sorted(self._own_dirs("iter_*", r"iter_\d{6,}"))

    def unfinished_rl_checkpoints(self) -> list[Path]:
        """Checkpoints a killed run left half-written: directories named as ``atomic_dir`` names
        its staging (``.iter_000012.tmp-<pid>``); anything else under ``rl_checkpoints`` is not ours."""
        return self._own_dirs(".iter_*.tmp-*", r"\.iter_\d{6,}\.tmp-\d+")

    def _own_dirs(self, pattern: str, name: str) -> list[Path]:
        """Real directories (no symlinks) under ``rl_checkpoints`` whose whole name matches ``name``."""
        return [p for p in self.rl_checkpoints.glob(pattern)
                if re.fullmatch(name, p.name) and p.is_dir() and not p.is_symlink()]


@dataclass(frozen=True)
class CheckpointFiles:
    """The files of one checkpoint directory (an RL ``iter_N``, its staging directory while it is
    written, or an SFT step's): the learner's engine state, and in RL the controller's."""
    directory: Path

    # The RL loop's state besides the learner and sampler, by the key the loop saves it under.
    LOOP_STATE = {"groups_ahead": "groups_ahead.json",  # rl.max_staleness >= 1: the next groups
                  "partial_responses": "partial_responses.json"}  # rollout.token_budget

    @property
    def controller_state(self) -> Path:
        """The iteration, the sampler's state and the run's starting model."""
        return self.directory / "controller_state.json"

    @property
    def weights(self) -> Path:
        """Rank 0's full weights: the prefix of ``infra.checkpoint.save_state``'s two files."""
        return self.directory / "weights"

    def optimizer(self, rank: int) -> Path:
        """Rank ``rank``'s optimizer partition and scheduler position, as ``weights``."""
        return self.directory / f"optimizer_rank{rank}"

    def loop_state(self, key: str) -> Path:
        return self.directory / self.LOOP_STATE[key]

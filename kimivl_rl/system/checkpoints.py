"""RL checkpoints: the learner's state, the sampler's, the iteration and the loop's state, written
atomically under ``rl/checkpoints/iter_N`` (file names: ``infra.layout.CheckpointFiles``); the
newest complete one is where a rerun, or a rebuilt learner group, continues.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from kimivl_rl.config import Config
from kimivl_rl.infra.checkpoint import MANIFEST, CheckpointError, atomic_dir, verify_manifest
from kimivl_rl.infra.layout import CheckpointFiles, OutputLayout
from kimivl_rl.infra.remote import wait_all
from kimivl_rl.rl.sampler import PromptSampler
from kimivl_rl.system.actors import RLActors

log = logging.getLogger(__name__)


def latest_checkpoint(cfg: Config) -> Optional[Path]:
    """The newest checkpoint whose manifest checks out; broken ones are skipped with a warning."""
    for directory in reversed(OutputLayout.of(cfg).rl_checkpoint_dirs()):
        try:
            verify_manifest(directory)
            return directory
        except CheckpointError as exc:
            log.warning("ignoring checkpoint: %s", exc)
    return None


def resume_advice(cfg: Config) -> str:
    """Where a rerun of a stopped run starts: the newest complete checkpoint, or RL's start."""
    checkpoint = latest_checkpoint(cfg)
    return (f"the newest complete checkpoint is {checkpoint}, and rerunning the same command "
            f"resumes from it" if checkpoint else
            f"no checkpoint was written yet (under {OutputLayout.of(cfg).rl_checkpoints}), so "
            f"rerunning the same command starts RL over")


def saved_loop_state(cfg: Config, iteration: int, key: str) -> Optional[dict]:
    """The loop state ``key`` that the checkpoint of ``iteration`` holds, if any."""
    path = CheckpointFiles(OutputLayout.of(cfg).rl_checkpoint(iteration)).loop_state(key)
    return json.loads(path.read_text()) if iteration and path.is_file() else None


@dataclass
class Checkpoints:
    """Saves and restores one RL run's checkpoints; ``input_model`` (the run's starting model) is
    recorded so that ``kimivl-rl eval`` can turn a checkpoint into a model."""
    actors: RLActors
    cfg: Config
    sampler: PromptSampler
    input_model: str

    def save(self, iteration: int, loop_state: dict[str, dict],
             written: Callable[[float], None] = lambda seconds: None) -> Path:
        """Learner state, sampler state, the iteration and the loop's state (groups collected
        ahead, partial responses: ``Lockstep.state_files``, consistent with the sampler's).
        ``written(seconds)`` runs once every file is on disk, before the checkpoint is published."""
        layout = OutputLayout.of(self.cfg)
        final = layout.rl_checkpoint(iteration)
        started = time.perf_counter()
        with atomic_dir(final, lambda: written(time.perf_counter() - started)) as staging:
            wait_all([l.save.remote(str(staging)) for l in self.actors.learners], "learner",
                     f"save checkpoint {final.name}", self.cfg.cluster.call_timeout_s)
            files = CheckpointFiles(staging)
            files.controller_state.write_text(json.dumps(
                {"iteration": iteration, "sampler": self.sampler.state_dict(),
                 "input_model": self.input_model}))
            for key, state in loop_state.items():
                files.loop_state(key).write_text(json.dumps(state))
        # Only published checkpoints rotate out: a directory without a manifest was not written here.
        published = [d for d in layout.rl_checkpoint_dirs() if (d / MANIFEST).is_file()]
        for old in published[:-self.cfg.output.keep_last_checkpoints]:
            shutil.rmtree(old)
        for unfinished in layout.unfinished_rl_checkpoints():
            shutil.rmtree(unfinished, ignore_errors=True)
        return final

    def restore(self) -> int:
        """Load the last checkpoint into the learners and sampler, sync the rollout engines, and
        return the first iteration still to run (0 when there is none)."""
        actors, checkpoint = self.actors, latest_checkpoint(self.cfg)
        if checkpoint is None:
            # restarted learners hold the starting model again; sleeping engines hold nothing
            if actors.weights_version or actors.engines_asleep:
                actors.sync_weights(version=0)
            return 0
        state = json.loads(CheckpointFiles(checkpoint).controller_state.read_text())
        wait_all([l.load.remote(str(checkpoint)) for l in actors.learners], "learner",
                 f"load {checkpoint.name}", self.cfg.cluster.call_timeout_s)
        self.sampler.load_state_dict(state["sampler"])
        actors.sync_weights(version=state["iteration"])
        log.info("resumed RL from %s", checkpoint)
        return state["iteration"]

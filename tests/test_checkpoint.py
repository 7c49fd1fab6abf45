"""Checkpoints are atomic: a crash while writing one, or a damaged one, never becomes the
checkpoint a resume picks."""
from __future__ import annotations

import subprocess
import sys

from kimivl_rl.config import load_config
from kimivl_rl.infra.checkpoint import atomic_dir, load_state, save_state
from kimivl_rl.infra.layout import OutputLayout
from kimivl_rl.system.checkpoints import latest_checkpoint


def _cfg(tmp_path):
    return load_config("configs/tiny.yaml", [f"output.dir={tmp_path}"])


def _write_checkpoint(root, iteration: int) -> None:
    import torch

    with atomic_dir(root / f"iter_{iteration:06d}") as staging:
        save_state({"w": torch.full((4,), float(iteration))}, staging / "learner")


def test_a_crash_inside_the_write_leaves_the_previous_checkpoint_as_latest(tmp_path):
    root = OutputLayout.of(_cfg(tmp_path)).rl_checkpoints
    for iteration in (1, 2):
        _write_checkpoint(root, iteration)
    crash = ("import os, signal, sys; from pathlib import Path; "
             "from kimivl_rl.infra.checkpoint import atomic_dir\n"
             "with atomic_dir(Path(sys.argv[1])) as staging:\n"
             "    (staging / 'half.safetensors').write_bytes(b'x' * 1000)\n"
             "    os.kill(os.getpid(), signal.SIGKILL)\n")
    result = subprocess.run([sys.executable, "-c", crash, str(root / "iter_000003")])
    assert result.returncode == -9
    assert not (root / "iter_000003").exists()  # only a hidden staging directory is left
    assert latest_checkpoint(_cfg(tmp_path)).name == "iter_000002"
    assert float(load_state(latest_checkpoint(_cfg(tmp_path)) / "learner")["w"][0]) == 2.0


def test_a_damaged_or_unfinished_checkpoint_is_skipped_with_a_warning(tmp_path, caplog):
    root = OutputLayout.of(_cfg(tmp_path)).rl_checkpoints
    for iteration in (1, 2, 3):
        _write_checkpoint(root, iteration)
    damaged = next((root / "iter_000003").glob("*.safetensors"))
    damaged.write_bytes(damaged.read_bytes()[:-8])  # truncated on disk
    (root / "iter_000002" / "MANIFEST.json").unlink()  # as if copied without its manifest
    assert latest_checkpoint(_cfg(tmp_path)).name == "iter_000001"
    warnings = " ".join(r.getMessage() for r in caplog.records)
    assert "iter_000003" in warnings and "checksum" in warnings
    assert "iter_000002" in warnings and "incomplete" in warnings

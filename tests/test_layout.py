"""The output layout: every path under ``output.dir``, absolute, named as the README says."""
from __future__ import annotations

import subprocess
import sys

from kimivl_rl.config import load_config
from kimivl_rl.infra.layout import OutputLayout


def test_every_path_is_under_the_absolute_output_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    layout = OutputLayout.of(load_config(None, ["output.dir=runs/out"]))
    root = tmp_path / "runs" / "out"
    assert layout.root == root
    assert layout.model("joint") == root / "sft_joint" / "model"
    assert layout.metrics("long_cot") == root / "sft_long_cot" / "metrics.jsonl"
    assert layout.tensorboard("rl") == root / "tensorboard" / "rl"
    assert layout.rl_checkpoint(12) == root / "rl" / "checkpoints" / "iter_000012"
    assert layout.eval_report("/models/step-3/") == root / "eval" / "step-3.json"
    assert layout.eval_report(str(layout.model("long_cot"))) == root / "eval" / "sft_long_cot.json"
    assert (layout.config, layout.summary, layout.plots) == (
        root / "config.yaml", root / "summary.json", root / "plots")


def test_the_layout_imports_nothing_of_kimivl_rl():
    code = ("import sys, kimivl_rl.infra.layout; "
            "print(sorted(m for m in sys.modules if m.startswith(('kimivl_rl.', 'sft'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['kimivl_rl.infra', 'kimivl_rl.infra.layout']"


def test_rl_checkpoint_dirs_are_the_directories_it_names_oldest_first(tmp_path):
    layout = OutputLayout.of(load_config(None, [f"output.dir={tmp_path}"]))
    for iteration in (10, 2):
        layout.rl_checkpoint(iteration).mkdir(parents=True)
    (layout.rl_checkpoints / "iter_final").mkdir()            # a user's, not a name of ours
    (layout.rl_checkpoints / "iter_000003").write_text("x")    # a file
    (layout.rl_checkpoints / "iter_000004").symlink_to(tmp_path)  # a link elsewhere
    assert layout.rl_checkpoint_dirs() == [layout.rl_checkpoint(2), layout.rl_checkpoint(10)]


def test_unfinished_rl_checkpoints_are_only_the_staging_directories_atomic_dir_names(tmp_path):
    """What a killed run left half-written is removed on the next save; a user's directory that
    merely looks similar is not among it."""
    from kimivl_rl.infra.checkpoint import atomic_dir

    layout = OutputLayout.of(load_config(None, [f"output.dir={tmp_path}"]))
    with atomic_dir(layout.rl_checkpoint(7)) as staging:
        assert layout.unfinished_rl_checkpoints() == [staging]
        (layout.rl_checkpoints / ".iter_notes.tmp-backup").mkdir()       # a user's
        (layout.rl_checkpoints / ".iter_000008.tmp-12").write_text("x")   # a file
        assert layout.unfinished_rl_checkpoints() == [staging]
    assert layout.unfinished_rl_checkpoints() == []

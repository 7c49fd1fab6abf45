"""CPU smoke runs of the GPU benchmarks' tiny paths: every variant runs and its ratios print."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_bench(*args: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_learner_bench_rl_update_tiny():
    out = run_bench("-m", "torch.distributed.run", "--nproc_per_node", "1", "bench/learner_gpu.py",
                    "--tiny", "--rl", "--seq", "256", "--doc", "128", "--steps", "1")
    for variant in ("ds+fused", "rl+full", "rl+chunked"):
        assert any(line.startswith(variant) and "tokens/s" in line for line in out.splitlines())
    assert "rl+chunked / rl+full:" in out and "rl+chunked / ds+fused:" in out


@pytest.mark.slow
def test_learner_bench_vlm_vision_attention_tiny():
    out = run_bench("-m", "torch.distributed.run", "--nproc_per_node", "1", "bench/learner_gpu.py",
                    "--tiny", "--shape", "vlm", "--seq", "256", "--doc", "128", "--image", "112",
                    "--steps", "1", "--variants", "ds+fused", "--vision-attention", "loop,varlen")
    for row in ("ds+fused loop", "ds+fused varlen"):
        assert any(line.startswith(row) and "tokens/s" in line for line in out.splitlines())
    assert "ds+fused varlen / ds+fused loop:" in out

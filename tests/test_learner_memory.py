"""What lets a large policy learn beside a colocated engine on one GPU: ZeRO-Offload
(``rl.offload_optimizer``) takes the same steps as the optimizer kept in device memory, and
``reset_optimizer`` frees Adam's moments."""
from __future__ import annotations

import subprocess
import sys

import pytest

from kimivl_rl.config import ConfigError, load_config
from ports import free_ports

# One DeepSpeed rank (a process group of its own, so in a child process): three ZeRO-2 steps of a
# small network with the optimizer in memory and offloaded, then the moments reset.
STEPS = """
import os, sys, torch, torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
dist.init_process_group("gloo", rank=0, world_size=1)
from kimivl_rl.training.engine import _base_optimizer, build_engine, reset_optimizer
x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
weights = []
for offload in (False, True):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    initial = [p.detach().clone() for p in model.parameters()]
    engine = build_engine(model, lambda step: 1e-2, zero_stage=2, offload_optimizer=offload)
    assert engine.optimizer.cpu_offload == offload
    for _ in range(3):
        engine.backward(engine(x).pow(2).mean())
        engine.step()
    weights.append([p.detach().clone() for p in engine.module.parameters()])
    assert all((w - i).abs().min() > 0 for w, i in zip(weights[-1], initial))  # every weight moved
    assert len(_base_optimizer(engine).state) > 0
    reset_optimizer(engine)
    assert not _base_optimizer(engine).state
first, offloaded = weights
print("largest difference", max((a - b).abs().max().item() for a, b in zip(first, offloaded)))
assert all(torch.equal(a, b) for a, b in zip(first, offloaded))
"""


def test_offloaded_optimizer_steps_equal_the_in_memory_ones_and_reset_frees_the_moments():
    """The same AdamW arithmetic on the same fp32 partitions, only where they live differs: the
    weights are equal bit for bit."""
    done = subprocess.run([sys.executable, "-c", STEPS, str(free_ports(1)[0])], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "largest difference 0.0" in done.stdout


def test_offloading_needs_a_zero_stage_that_partitions_the_optimizer():
    with pytest.raises(ConfigError, match="rl.offload_optimizer: .*rl.zero_stage"):
        load_config("configs/tiny.yaml", ["rl.offload_optimizer=true", "rl.zero_stage=0"])
    assert load_config("configs/tiny.yaml", ["rl.offload_optimizer=true"]).rl.offload_optimizer

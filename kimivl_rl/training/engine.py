"""The DeepSpeed engine shared by the SFT workers and the RL learners, and its checkpoints.

One place decides the DeepSpeed config (ZeRO stage, precision, accumulation), builds the engine
around a plain torch AdamW (no JIT-compiled optimizer op needed), and saves or restores its
state without pickle: weights through ``save_pretrained`` (safetensors), each rank's optimizer
partition through ``kimivl_rl.infra.checkpoint.save_state``.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Callable

import deepspeed
import torch

from kimivl_rl.infra.checkpoint import load_state, save_state
from kimivl_rl.infra.layout import CheckpointFiles
from kimivl_rl.models.families import family_of

log = logging.getLogger(__name__)


def deepspeed_config(zero_stage: int, grad_accum_steps: int, bf16: bool,
                     grad_clip: float = 1.0, offload_optimizer: bool = False) -> dict:
    zero = {"stage": zero_stage}
    if offload_optimizer:
        # pageable host memory: pinning tens of GB can fail where the bench runs
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": grad_accum_steps,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        # torch's AdamW steps the offloaded partitions (DeepSpeedCPUAdam needs a compiled op)
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # progress is ours to report
        "wall_clock_breakdown": False,
    }


def process_group_backend(use_gpu: bool) -> str:
    """torch.distributed's backend for SFT workers and learner ranks: on GPUs the loops' small
    counts and sums stay on the CPU (gloo) beside the model's NCCL collectives."""
    return "cpu:gloo,cuda:nccl" if use_gpu else "gloo"


def trainable_parameters(model: torch.nn.Module, freeze_prefixes: tuple[str, ...] = ()) -> list:
    """Freeze parameters under the given name prefixes; return the rest."""
    for name, param in model.named_parameters():
        if any(name.startswith(p) for p in freeze_prefixes):
            param.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def build_engine(model: torch.nn.Module, lr_at_step: Callable[[int], float], *, zero_stage: int,
                 grad_accum_steps: int = 1, weight_decay: float = 0.0, bf16: bool = False,
                 freeze_prefixes: tuple[str, ...] = (), offload_optimizer: bool = False):
    """A DeepSpeed engine whose learning rate at optimizer step k is ``lr_at_step(k)``."""
    params = trainable_parameters(model, freeze_prefixes)
    # lr=1.0 so that LambdaLR's factor is the learning rate itself.
    # On GPU one fused kernel updates every parameter (measured in bench/learner_gpu.py).
    optimizer = torch.optim.AdamW(params, lr=1.0, betas=(0.9, 0.95), weight_decay=weight_decay,
                                  fused=torch.cuda.is_available() and not offload_optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at_step)
    config = deepspeed_config(zero_stage, grad_accum_steps, bf16, offload_optimizer=offload_optimizer)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                      config=config)
    return engine


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer's activations in backward: memory for one layer's instead of
    every layer's, for about a third more compute."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer holding Adam moments: ZeRO wraps it, stage 0 does not."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


@contextlib.contextmanager
def _optimizer_groups_attached(engine):
    """ZeRO-3 attaches its fp32 partitions to the torch optimizer only around a step; the
    optimizer's state_dict needs them attached."""
    if engine.zero_optimization_stage() != 3:
        yield
        return
    engine.optimizer._set_fp32_optimizer_param_groups()
    try:
        yield
    finally:
        engine.optimizer._clear_fp32_optimizer_param_groups()


def reset_optimizer(engine) -> None:
    """Forget Adam moments (the k1.5 recipe resets the optimizer every RL iteration)."""
    _base_optimizer(engine).state.clear()


def full_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """The whole model's weights on rank 0 (gathered under ZeRO-3); None elsewhere."""
    if engine.zero_optimization_stage() == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    return engine.module.state_dict() if engine.global_rank == 0 else None


def save_pretrained(engine, out_dir: str | Path, processor=None) -> None:
    """Write a Hugging Face checkpoint (safetensors) from rank 0."""
    state = full_state_dict(engine)
    if engine.global_rank == 0:
        engine.module.save_pretrained(out_dir, state_dict=state)
        family_of(engine.module).finish_checkpoint(out_dir)
        if processor is not None:
            processor.save_pretrained(out_dir)


def save_engine_state(engine, directory: str | Path) -> None:
    """Weights (rank 0) plus every rank's optimizer partition and scheduler position."""
    files = CheckpointFiles(Path(directory))
    weights = full_state_dict(engine)
    if engine.global_rank == 0:
        save_state(weights, files.weights)
    with _optimizer_groups_attached(engine):
        state = {"optimizer": _base_optimizer(engine).state_dict(),
                 "scheduler": engine.lr_scheduler.state_dict()}
    save_state(state, files.optimizer(engine.global_rank))


def load_engine_state(engine, directory: str | Path) -> None:
    """Restore what ``save_engine_state`` wrote, with the same world size."""
    files = CheckpointFiles(Path(directory))
    weights = load_state(files.weights)
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=0,
                                           enabled=engine.zero_optimization_stage() == 3):
        engine.module.load_state_dict(weights)
    state = load_state(files.optimizer(engine.global_rank))
    with _optimizer_groups_attached(engine):
        _base_optimizer(engine).load_state_dict(state["optimizer"])
    engine.lr_scheduler.load_state_dict(state["scheduler"])
    if engine.zero_optimization_stage() > 0:
        engine.optimizer.refresh_fp32_params()  # ZeRO's fp32 master copy follows the weights

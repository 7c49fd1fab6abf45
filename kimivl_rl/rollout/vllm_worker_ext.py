"""Methods added to vLLM's worker processes (vLLM's ``worker_extension_cls`` hook).

Lives beside ``vllm_engine`` as part of the vLLM adapter; vLLM imports it by path inside each
worker process.
"""
from __future__ import annotations

import logging
import torch
from safetensors.torch import load_file

from kimivl_rl.infra.ipc_weight_sync import receive_ring, receive_weights_through_ring
from kimivl_rl.infra.weight_sync import new_weight_group, receive_weights

RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"
# Logs two INFO lines per reload; the sync's time is in the RL metrics (time_sync_s) instead.
RELOAD_TIMING_LOGGER = "vllm.model_executor.model_loader.reload.inplace"
NOT_LOADED = "%s: Failed to load weights"  # the message, as vLLM logs it


class ComputedBufferWarnings(logging.Filter):
    """Drops vLLM's "<layer>: Failed to load weights" for the given layer classes only."""

    def __init__(self):
        super().__init__()
        self.layers: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg == NOT_LOADED and record.args[0] in self.layers)


def _buffers_only(module: torch.nn.Module) -> bool:
    return not list(module.parameters(recurse=False)) and bool(list(module.buffers(recurse=False)))


def quiet_reload_log(model: torch.nn.Module) -> None:
    """Keep out of the log vLLM's per-reload INFO lines and the reload warning of layers that
    hold only buffers vLLM computes from the config (rotary cos/sin caches, the image
    normaliser's scale and shift): no checkpoint carries them, and vLLM puts their unchanged
    values back after every reload."""
    logging.getLogger(RELOAD_TIMING_LOGGER).setLevel(logging.WARNING)
    logger = logging.getLogger(RELOAD_LOGGER)
    quiet = next((f for f in logger.filters if isinstance(f, ComputedBufferWarnings)), None)
    if quiet is None:
        quiet = ComputedBufferWarnings()
        logger.addFilter(quiet)
    quiet.layers |= {type(m).__name__ for m in model.modules() if _buffers_only(m)}


def prepack_cpu_experts(model: torch.nn.Module) -> int:
    """Put every CPU mixture-of-experts layer's reloaded weights back in the packed layout its
    kernel reads; returns how many layers were packed.

    vLLM 0.32 prepacks them once, at load; an in-place reload copies the plain weights into the
    packed tensors and skips the prepacking (``UnquantizedFusedMoEMethod._setup_kernel`` calls
    the experts' ``process_weights_after_loading`` on the first load only), so a reloaded MoE
    model computes garbage (tests/test_family_parity.py). kimivl-rl always reloads whole
    models, so every MoE layer holds plain weights here."""
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

    packed = 0
    for layer in model.modules():
        kernel = getattr(getattr(layer, "quant_method", None), "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        if isinstance(experts, CPUUnquantizedExperts):
            experts.process_weights_after_loading(layer)
            packed += 1
    return packed


class WorkerExtension:
    """Weight reload inside vLLM's worker processes."""

    def _reload(self, weights) -> None:
        # The CPU backend repacks linear layers at load time, so plain ``model.load_weights``
        # after start leaves empty parameters; ``reload_weights`` redoes the repacking.
        model = self.model_runner.get_model()
        quiet_reload_log(model)
        self.model_runner.reload_weights(weights_iterator=weights)
        if self.device.type == "cpu":
            prepack_cpu_experts(model)

    def reload_weights_from_file(self, path: str) -> None:
        self._reload(iter(load_file(path).items()))

    def parameter_sums(self) -> dict[str, float]:
        """A float64 sum of each of the model's parameters, in vLLM's layout: two engines hold
        the same weights when these agree exactly (a sync checked against a load)."""
        return {name: float(p.double().sum()) for name, p in self.model_runner.get_model().named_parameters()}

    def attach_weight_ring(self, address: tuple[str, int], authkey: bytes) -> None:
        """Join the colocated learner's channel and map its ring of weight buffers, in place of
        any ring attached before."""
        old = getattr(self, "kimivl_ring_channel", None)  # vLLM builds the worker, not us
        if old is not None:
            old.close()
        self.kimivl_ring_channel, self.kimivl_ring = receive_ring(address, authkey)

    def receive_weights_through_ring(self) -> None:
        """Take one sync through the ring, streamed into the same in-place reload."""
        self._reload(receive_weights_through_ring(self.kimivl_ring_channel, self.kimivl_ring,
                                                  self.device))

    def init_weight_update_group(self, host: str, port: int, rank_offset: int, world_size: int,
                                 backend: str, timeout_s: float) -> None:
        """Join the learner's weight-update group as rank ``rank_offset`` + this worker's rank in
        its engine, in place of any group joined before."""
        self.kimivl_weight_group = new_weight_group(
            host, port, rank_offset + self.rank, world_size, backend, timeout_s,
            replacing=getattr(self, "kimivl_weight_group", None))  # vLLM builds the worker, not us

    def receive_weights(self) -> None:
        """Take one broadcast of the learner's weights, streamed bucket by bucket into the same
        in-place reload as ``reload_weights_from_file``."""
        self._reload(receive_weights(self.kimivl_weight_group, self.device))

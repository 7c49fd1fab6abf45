"""Methods added to vLLM's worker processes (vLLM's ``worker_extension_cls`` hook).

Lives beside ``vllm_engine`` as part of the vLLM adapter; vLLM imports it by path inside each
worker process.
"""
from __future__ import annotations

from safetensors.torch import load_file

from kimivl_rl.weight_sync import new_weight_group, receive_weights


class WorkerExtension:
    """Weight reload inside vLLM's worker processes."""

    def reload_weights_from_file(self, path: str) -> None:
        # The CPU backend repacks linear layers at load time, so plain ``model.load_weights``
        # after start leaves empty parameters; ``reload_weights`` redoes the repacking.
        tensors = load_file(path)
        self.model_runner.reload_weights(weights_iterator=iter(tensors.items()))

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
        self.model_runner.reload_weights(
            weights_iterator=receive_weights(self.kimivl_weight_group, self.device))

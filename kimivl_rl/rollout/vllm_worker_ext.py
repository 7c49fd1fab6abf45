"""Methods added to vLLM's worker processes (vLLM's ``worker_extension_cls`` hook).

Lives beside ``vllm_engine`` as part of the vLLM adapter; vLLM imports it by path inside each
worker process.
"""
from __future__ import annotations

from safetensors.torch import load_file


class WorkerExtension:
    """Weight reload inside vLLM's worker processes."""

    def reload_weights_from_file(self, path: str) -> None:
        # The CPU backend repacks linear layers at load time, so plain ``model.load_weights``
        # after start leaves empty parameters; ``reload_weights`` redoes the repacking.
        tensors = load_file(path)
        self.model_runner.reload_weights(weights_iterator=iter(tensors.items()))

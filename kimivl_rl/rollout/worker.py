"""The rollout worker: a thin Ray actor shell around one vLLM engine."""
from __future__ import annotations

from typing import Optional

import torch

from kimivl_rl.rollout.vllm_engine import EngineOptions, GenerationRequest, Sample, VLLMEngine


class RolloutWorker:
    """Generates k samples per prompt, token-in/token-out, and takes new weights in place."""

    def __init__(self, options: EngineOptions):
        self.engine = VLLMEngine(options)
        self.weights_version = 0

    def ready(self) -> bool:
        return True

    def generate(self, requests: list[GenerationRequest], n: int, temperature: float, top_p: float,
                 max_new_tokens: int, seed: Optional[int]) -> list[list[Sample]]:
        return self.engine.generate(requests, n=n, temperature=temperature, top_p=top_p,
                                    max_new_tokens=max_new_tokens, seed=seed)

    def load_weights(self, named_tensors: dict[str, torch.Tensor], version: int) -> int:
        self.engine.load_weights(named_tensors)
        self.weights_version = version
        return version

    def init_weight_update_group(self, host: str, port: int, rank_offset: int, world_size: int,
                                 backend: str, timeout_s: float) -> None:
        self.engine.init_weight_update_group(host, port, rank_offset, world_size, backend, timeout_s)

    def receive_weights(self, version: int) -> int:
        self.engine.receive_weights()
        self.weights_version = version
        return version

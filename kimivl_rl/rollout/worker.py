"""The rollout worker: a thin Ray actor shell around one vLLM engine."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch

from kimivl_rl.rollout.vllm_engine import EngineOptions, VLLMEngine
from kimivl_rl.types import GenerationRequest, Sample


class RolloutWorker:
    """Generates k samples per prompt, token-in/token-out, and takes new weights in place. A
    colocated engine sleeps while the learner steps; the next weight sync wakes it."""

    def __init__(self, options: EngineOptions):
        self.engine = VLLMEngine(options)
        self.weights_version = 0
        self.asleep = False

    def ready(self) -> bool:
        return True

    def generate(self, requests: list[GenerationRequest], n: int, temperature: float, top_p: float,
                 max_new_tokens: int, seed: Optional[int]) -> list[list[Sample]]:
        if self.asleep:  # its weights were discarded: only a sync brings them back
            raise RuntimeError("the rollout engine is asleep: sync weights before generating")
        return self.engine.generate(requests, n=n, temperature=temperature, top_p=top_p,
                                    max_new_tokens=max_new_tokens, seed=seed)

    def sleep(self) -> float:
        """Give the GPU to the learner; returns the GiB this freed (0 where sleep mode is off)."""
        if not self.engine.options.sleep_mode or self.asleep:
            return 0.0
        used_before = torch.cuda.device_memory_used()  # NVML: no CUDA context in this process
        self.engine.sleep()
        self.asleep = True
        return (used_before - torch.cuda.device_memory_used()) / 2**30

    @contextmanager
    def _taking_weights(self, version: int) -> Iterator[None]:
        """Around a weight sync: a sleeping engine takes back its weights' memory first and its
        KV cache after, so the two never sit beside a full second copy."""
        if self.asleep:
            self.engine.wake_up("weights")
        yield
        if self.asleep:
            self.engine.wake_up("kv_cache")
            self.asleep = False
        self.weights_version = version

    def load_weights(self, named_tensors: dict[str, torch.Tensor], version: int) -> int:
        with self._taking_weights(version):
            self.engine.load_weights(named_tensors)
        return version

    def init_weight_update_group(self, host: str, port: int, rank_offset: int, world_size: int,
                                 backend: str, timeout_s: float) -> None:
        self.engine.init_weight_update_group(host, port, rank_offset, world_size, backend, timeout_s)

    def receive_weights(self, version: int) -> int:
        with self._taking_weights(version):
            self.engine.receive_weights()
        return version

    def attach_weight_ring(self, address: tuple[str, int], authkey: bytes) -> None:
        self.engine.attach_weight_ring(address, authkey)

    def receive_weights_through_ring(self, version: int) -> int:
        with self._taking_weights(version):
            self.engine.receive_weights_through_ring()
        return version

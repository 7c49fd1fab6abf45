"""Weight sync from the learner group to every rollout worker after each update.

A transport is one class with ``push``; the controller does not know how bytes travel.
``ObjectStoreTransport`` (CPU, and any single-node setup) hands rank 0's weights to the rollout
workers as one Ray object-store reference: Ray moves the bytes between processes once per node,
the driver never holds them, and each worker reloads them in place in its vLLM engine.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

from kimivl_rl.remote import wait_all


@dataclass
class SyncStats:
    version: int
    seconds: float


class WeightTransport(Protocol):
    def push(self, learners: list, rollout_workers: list, version: int) -> SyncStats: ...


class ObjectStoreTransport:
    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s

    def push(self, learners: list, rollout_workers: list, version: int) -> SyncStats:
        started = time.perf_counter()
        # Every rank is asked: under ZeRO-3 gathering the full weights is a collective.
        states = [learner.state_for_sync.remote() for learner in learners]
        loads = [worker.load_weights.remote(states[0], version) for worker in rollout_workers]
        wait_all(states, "learner", "gather weights for sync", self.timeout_s)
        wait_all(loads, "rollout", f"load weights version {version}", self.timeout_s)
        return SyncStats(version, time.perf_counter() - started)


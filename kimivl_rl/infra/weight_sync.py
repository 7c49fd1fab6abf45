"""Weight sync from the learner group to every rollout worker after each update.

A transport is one class with ``from_config``, ``push`` and ``reset``; the controller picks one
by ``cluster.weight_transport`` and does not know how bytes travel.

``ObjectStoreTransport`` (CPU, and any single-node setup) hands rank 0's weights to the rollout
workers as one Ray object-store reference: Ray moves the bytes between processes once per node,
the driver never holds them, and each worker reloads them in place in its vLLM engine.

``CollectiveTransport`` (GPUs apart) broadcasts them from learner rank 0 to every vLLM worker process
over a process group of their own (NCCL on GPU, gloo on CPU), in buckets of at most
``cluster.weight_bucket_bytes``: the bucket plan goes first, then each bucket as one flat byte
tensor, which the receivers cut back into named tensors and stream into vLLM's in-place reload.

``IPCTransport`` (``kimivl_rl/infra/ipc_weight_sync.py``: an engine sharing the learner's GPU)
copies them through a ring of buffers the two processes share.
"""
from __future__ import annotations

import datetime
from abc import ABC, abstractmethod
import json
import math
import socket
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, NamedTuple, Optional, Protocol, Sequence

import torch

from kimivl_rl.infra.remote import wait_all, wait_one

LOOPBACK = "127.0.0.1"
# Every tensor starts at a multiple of this inside its bucket, so a byte slice can be viewed as
# any dtype (views need offsets divisible by the element size) and GPU copies stay aligned.
ALIGN = 64


@dataclass
class SyncStats:
    version: int
    seconds: float


class WeightTransport(Protocol):
    def push(self, learners: list, rollouts: Mapping[str, Any], version: int) -> SyncStats:
        """Update ``rollouts`` (rollout workers by name, ``rollout-<index>``) to the learners'
        weights, as ``version``."""

    def reset(self) -> None:
        """A rollout worker was restarted: forget whatever connects to the old process."""


# ----------------------------------------------------------------------------- bucket plan

class TensorSlot(NamedTuple):
    """Where one named tensor lies in its bucket. Plain values only: the plan travels as JSON."""
    name: str
    dtype: str                # torch dtype name: "float32", "bfloat16", ...
    shape: tuple[int, ...]
    offset: int               # first byte

    @property
    def end(self) -> int:
        return self.offset + math.prod(self.shape) * getattr(torch, self.dtype).itemsize


Bucket = list[TensorSlot]  # consecutive slots; the bucket's size is its last slot's end


def plan_buckets(specs: Iterable[tuple[str, torch.dtype, Sequence[int]]], cap_bytes: int) -> list[Bucket]:
    """(name, dtype, shape) in order, packed into consecutive buckets of at most ``cap_bytes``
    (alignment padding included); a tensor larger than the cap gets a bucket of its own."""
    buckets: list[Bucket] = []
    for name, dtype, shape in specs:
        offset = -(-bucket_bytes(buckets[-1]) // ALIGN) * ALIGN if buckets else 0
        slot = TensorSlot(name, str(dtype).removeprefix("torch."), tuple(shape), offset)
        if not buckets or slot.end > cap_bytes:
            buckets.append([])
            slot = slot._replace(offset=0)
        buckets[-1].append(slot)
    return buckets


def bucket_bytes(bucket: Bucket) -> int:
    return bucket[-1].end


def flatten_bucket(tensors: Mapping[str, torch.Tensor], bucket: Bucket, device: torch.device | str = "cpu",
                   out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The bucket's tensors as one uint8 tensor on ``device`` (one broadcast, whatever the dtypes),
    or at the start of the byte buffer ``out``."""
    flat = torch.empty(bucket_bytes(bucket), dtype=torch.uint8, device=device) if out is None else out
    for slot in bucket:
        flat[slot.offset:slot.end].copy_(tensors[slot.name].detach().reshape(-1).view(torch.uint8))
    return flat


def unflatten_bucket(flat: torch.Tensor, bucket: Bucket) -> list[tuple[str, torch.Tensor]]:
    """Named views into ``flat``: each bucket needs a buffer of its own while they are in use."""
    return [(slot.name, flat[slot.offset:slot.end].view(getattr(torch, slot.dtype)).view(slot.shape))
            for slot in bucket]


def encode_plan(plan: list[Bucket]) -> bytes:
    return json.dumps(plan).encode()


def decode_plan(data: bytes) -> list[Bucket]:
    return [[TensorSlot(name, dtype, tuple(shape), offset) for name, dtype, shape, offset in bucket]
            for bucket in json.loads(data)]


# ----------------------------------------------------------------------------- the process group

def listen(host: str) -> socket.socket:
    """A listening socket on a free port of ``host``, for rank 0's store. Handing the store a
    socket is what keeps it on ``host``: given only a port, TCPStore listens on every interface."""
    return socket.create_server((host, 0))


def new_weight_group(host: str, port: int, rank: int, world_size: int, backend: str, timeout_s: float,
                     listener: Optional[socket.socket] = None, replacing=None):
    """A process group apart from torch.distributed's default one (the learners' DeepSpeed group,
    or vLLM's own inside its workers): rank 0 passes its ``listener``. Returns once every rank
    has joined."""
    if replacing is not None:
        replacing.abort()  # frees its connections (NCCL: a communicator) now; a member may be dead
    timeout = datetime.timedelta(seconds=timeout_s)
    store = torch.distributed.TCPStore(host, port, world_size, is_master=listener is not None,
                                       timeout=timeout, wait_for_workers=False,
                                       master_listen_fd=listener.detach() if listener else None)
    if backend == "nccl":
        return torch.distributed.ProcessGroupNCCL(store, rank, world_size, timeout)
    gloo = torch.distributed.ProcessGroupGloo
    options = gloo._Options()
    options._timeout = timeout
    # Gloo listens for its peers too: on loopback when the whole group is on one node.
    options._devices = [gloo.create_device(hostname=host) if host == LOOPBACK else gloo.create_default_device()]
    return gloo(store, rank, world_size, options)


def _broadcast_bytes(group, data: Optional[bytes], device) -> bytes:
    """Rank 0's ``data`` on every rank; the length goes first so receivers can size the buffer."""
    size = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64, device=device)
    group.broadcast(size, 0).wait()
    if data is not None:
        flat = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
    else:
        flat = torch.empty(int(size), dtype=torch.uint8, device=device)
    group.broadcast(flat, 0).wait()
    return flat.cpu().numpy().tobytes()


def send_weights(group, tensors: Mapping[str, torch.Tensor], cap_bytes: int, device) -> int:
    """Rank 0: broadcast the bucket plan, then every bucket; returns the bytes sent."""
    plan = plan_buckets(((name, t.dtype, t.shape) for name, t in tensors.items()), cap_bytes)
    _broadcast_bytes(group, encode_plan(plan), device)
    for bucket in plan:
        group.broadcast(flatten_bucket(tensors, bucket, device), 0).wait()
    return sum(bucket_bytes(b) for b in plan)


def receive_weights(group, device) -> Iterator[tuple[str, torch.Tensor]]:
    """Every other rank: rank 0's named tensors, one bucket received as the consumer reaches it
    (so a reload holds about one bucket at a time). Consume it to the end: rank 0 waits."""
    for bucket in decode_plan(_broadcast_bytes(group, None, device)):
        # A fresh buffer each time: vLLM's reload may hold a layer's tensors until the layer's
        # last one arrives, possibly from the next bucket.
        flat = torch.empty(bucket_bytes(bucket), dtype=torch.uint8, device=device)
        group.broadcast(flat, 0).wait()
        yield from unflatten_bucket(flat, bucket)


# ----------------------------------------------------------------------------- transports

class ObjectStoreTransport:
    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s

    @classmethod
    def from_config(cls, cfg) -> "ObjectStoreTransport":
        return cls(cfg.cluster.call_timeout_s)

    def push(self, learners: list, rollouts: Mapping[str, Any], version: int) -> SyncStats:
        """``rollouts``: the rollout workers to update, by their names (``rollout-<index>``)."""
        started = time.perf_counter()
        # Every rank is asked: under ZeRO-3 gathering the full weights is a collective.
        states = [learner.state_for_sync.remote() for learner in learners]
        loads = [worker.load_weights.remote(states[0], version) for worker in rollouts.values()]
        wait_all(states, "learner", "gather weights for sync", self.timeout_s)
        wait_all(loads, list(rollouts), f"load weights version {version}", self.timeout_s)
        return SyncStats(version, time.perf_counter() - started)

    def reset(self) -> None:
        pass  # nothing outlives a push


class ConnectedTransport(ABC):
    """A transport whose learner rank 0 and engines are connected (``_connect``) on the first
    push, and again when the rollout workers pushed to change (a restarted one's recovery push,
    then the next full one); each push runs the learners' ``send`` and the engines' ``receive``
    methods together."""
    send = receive = ""  # the learner's and the rollout worker's method names

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self._members: Optional[dict] = None  # the rollout workers the live connection joins

    def reset(self) -> None:
        self._members = None

    def push(self, learners: list, rollouts: Mapping[str, Any], version: int) -> SyncStats:
        """``rollouts``: the rollout workers to update, by their names (``rollout-<index>``)."""
        started = time.perf_counter()
        if self._members != rollouts:
            self._connect(learners[0], rollouts)
            self._members = dict(rollouts)
        # Every rank is asked: under ZeRO-3 gathering the full weights is a collective.
        sends = [getattr(learner, self.send).remote() for learner in learners]
        receives = [getattr(worker, self.receive).remote(version) for worker in rollouts.values()]
        # Receivers first: a rollout worker that died mid-sync then surfaces as a dead actor
        # (which the controller recovers from), not as rank 0's broken send.
        wait_all(receives, list(rollouts), f"receive weights version {version}", self.timeout_s)
        wait_all(sends, "learner", f"send weights version {version}", self.timeout_s)
        return SyncStats(version, time.perf_counter() - started)

    @abstractmethod
    def _connect(self, learner, rollouts: Mapping[str, Any]) -> None:
        """Connect learner rank 0 with every engine worker of ``rollouts`` (workers by name)."""


class CollectiveTransport(ConnectedTransport):
    """Learner rank 0 (group rank 0) and every vLLM worker of the given rollout workers (ranks
    1.., ``workers_per_engine`` per engine) form a process group and broadcast over it."""
    send, receive = "broadcast_weights", "receive_weights"

    def __init__(self, timeout_s: float, backend: str, workers_per_engine: int = 1):
        super().__init__(timeout_s)
        self.backend, self.workers_per_engine = backend, workers_per_engine

    @classmethod
    def from_config(cls, cfg) -> "CollectiveTransport":
        return cls(cfg.cluster.call_timeout_s, "nccl" if cfg.cluster.use_gpu else "gloo",
                   cfg.rollout.tensor_parallel_size)

    def _connect(self, learner, rollouts: Mapping[str, Any]) -> None:
        import ray

        world = 1 + len(rollouts) * self.workers_per_engine
        single_node = sum(node["Alive"] for node in ray.nodes()) == 1
        host, port = wait_one(learner.weight_group_address.remote(single_node), "learner-0",
                              "open the weight-update group", self.timeout_s)
        joins = [learner.init_weight_update_group.remote(host, port, world, self.backend, self.timeout_s)]
        joins += [worker.init_weight_update_group.remote(host, port, 1 + i * self.workers_per_engine,
                                                         world, self.backend, self.timeout_s)
                  for i, worker in enumerate(rollouts.values())]
        wait_all(joins, ["learner-0", *rollouts], "join the weight-update group", self.timeout_s)


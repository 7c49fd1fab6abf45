"""Colocated weight sync: a learner and a rollout engine in two processes on one GPU share a
ring of bucket buffers, so the weights move as device-to-device copies and never cross the host.

The ring is shared once: its buffers are sent over the duplex ``channel`` (a ``multiprocessing``
connection, which serializes tensors with ``torch.multiprocessing``'s reductions: CUDA IPC
handles for a GPU ring, shared memory for a host ring), or handed to a child process at its
start. Each sync then goes through the channel (anything with ``send``, ``recv`` and ``poll`` of
small messages):

  sender                                          receiver
  plan (kimivl_rl.infra.weight_sync's bucket plan)  ->
  bucket k flattened into buffer k % slots;
  "k ready"                                   ->  copies buffer k % slots out of the ring
                                              <-  "k done" (the buffer may be reused)
  waits for "k - slots done" before filling that buffer again, and for every "done" at the end.

The receiver copies each bucket out before yielding its tensors, so its consumer (a torch
module's parameters, or vLLM's in-place reload, which may hold a layer's tensors until the
layer's last one arrives) keeps them as long as it likes while the sender fills the buffer anew.
"""
from __future__ import annotations

import secrets
import socket
from multiprocessing.connection import Client, Connection, answer_challenge, deliver_challenge
from typing import Any, Iterator, Mapping, Optional

import torch
import torch.multiprocessing  # registers the tensor reductions a connection sends the ring with

from kimivl_rl.infra.remote import wait_all, wait_one
from kimivl_rl.infra.weight_sync import (LOOPBACK, Bucket, ConnectedTransport, bucket_bytes, decode_plan,
                                         encode_plan, flatten_bucket, plan_buckets, unflatten_bucket)

RING_SLOTS = 2  # one buffer filling while the other is copied out


def new_ring(plan: list[Bucket], slots: int, device: torch.device | str) -> list[torch.Tensor]:
    """``slots`` byte buffers on ``device``, each as large as the plan's largest bucket."""
    size = max(bucket_bytes(bucket) for bucket in plan)
    return [torch.empty(size, dtype=torch.uint8, device=device) for _ in range(slots)]


def share_host_ring(ring: list[torch.Tensor]) -> None:
    """Put a host ring in shared memory that any process on the node can map: torch's default
    (file descriptors) reaches only processes started from this one."""
    torch.multiprocessing.set_sharing_strategy("file_system")
    for buffer in ring:
        buffer.share_memory_()


def _expect(channel, index: int, timeout_s: Optional[float] = None) -> None:
    """The other side's next message must be bucket ``index``: the two sides move in step."""
    if timeout_s is not None and not channel.poll(timeout_s):
        raise TimeoutError(f"weight ring: no word of bucket {index} within {timeout_s:.0f}s")
    got = channel.recv()
    if got != index:
        raise RuntimeError(f"weight ring out of step: expected bucket {index}, got {got!r}")


def _wait_for_device() -> None:
    """Copies are asynchronous on a GPU: the other process may only look once they are done."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def send_weights_through_ring(channel, tensors: Mapping[str, torch.Tensor], plan: list[Bucket],
                              ring: list[torch.Tensor], timeout_s: Optional[float] = None) -> int:
    """The sender's side of one sync; returns the bytes sent. ``plan`` must fit ``ring``; a
    receiver silent for ``timeout_s`` (None: wait) ends it with ``TimeoutError``."""
    channel.send(encode_plan(plan))
    for index, bucket in enumerate(plan):
        if index >= len(ring):
            _expect(channel, index - len(ring), timeout_s)  # that buffer's last bucket is copied out
        flatten_bucket(tensors, bucket, out=ring[index % len(ring)])
        _wait_for_device()
        channel.send(index)
    for index in range(max(0, len(plan) - len(ring)), len(plan)):
        _expect(channel, index, timeout_s)
    return sum(bucket_bytes(bucket) for bucket in plan)


def receive_weights_through_ring(channel, ring: list[torch.Tensor],
                                 device: torch.device | str) -> Iterator[tuple[str, torch.Tensor]]:
    """The receiver's side of one sync: the named tensors, on ``device``, each bucket in a
    buffer of its own. Consume it to the end: the sender waits."""
    for index, bucket in enumerate(decode_plan(channel.recv())):
        _expect(channel, index)
        flat = ring[index % len(ring)][:bucket_bytes(bucket)].to(device, copy=True)
        _wait_for_device()
        channel.send(index)
        yield from unflatten_bucket(flat, bucket)


# ----------------------------------------------------------------------------- the transport

def accept_channel(server: socket.socket, authkey: bytes, timeout_s: float) -> Connection:
    """The first peer to connect to ``server`` that proves it holds ``authkey`` (an HMAC
    challenge both ways: the channel's messages are trusted only between holders), as a channel;
    ``TimeoutError`` if none comes within ``timeout_s`` (``multiprocessing``'s Listener waits
    for good)."""
    server.settimeout(timeout_s)
    try:
        peer, _ = server.accept()
    except socket.timeout:
        raise TimeoutError(f"weight ring: no engine connected within {timeout_s:.0f}s") from None
    peer.settimeout(None)
    channel = Connection(peer.detach())
    deliver_challenge(channel, authkey)
    answer_challenge(channel, authkey)
    return channel


class RingSender:
    """The learner's side of a colocated sync: a ring of buffers on its device sized for the
    plan of ``tensors``, and a channel on loopback that only a holder of its random key joins;
    the ring goes to the peer over the channel once it has joined (``receive_ring``)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], bucket_cap: int, device, timeout_s: float):
        self.plan = plan_buckets(((name, t.dtype, t.shape) for name, t in tensors.items()), bucket_cap)
        self.ring = new_ring(self.plan, RING_SLOTS, device)
        if self.ring[0].device.type == "cpu":
            share_host_ring(self.ring)
        self.timeout_s = timeout_s
        self.authkey = secrets.token_bytes(32)
        self.server = socket.create_server((LOOPBACK, 0))
        self.channel: Optional[Connection] = None

    def invitation(self) -> tuple[tuple[str, int], bytes]:
        """What the engine needs to attach (``receive_ring``): the channel's address and key."""
        return self.server.getsockname(), self.authkey

    def accept(self) -> None:
        self.channel = accept_channel(self.server, self.authkey, self.timeout_s)
        self.server.close()
        self.channel.send(self.ring)  # shared, not copied: IPC handles or shared-memory names

    def send(self, tensors: Mapping[str, torch.Tensor]) -> int:
        return send_weights_through_ring(self.channel, tensors, self.plan, self.ring, self.timeout_s)

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
        self.server.close()


class IPCTransport(ConnectedTransport):
    """Learner rank 0 and the rollout engine colocated with it (``cluster.colocate``) share a ring
    of buffers (``RingSender``), made anew whenever either side was restarted."""
    send, receive = "send_weights_through_ring", "receive_weights_through_ring"

    @classmethod
    def from_config(cls, cfg) -> "IPCTransport":
        return cls(cfg.cluster.call_timeout_s)

    def _connect(self, learner, rollouts: Mapping[str, Any]) -> None:
        ((name, worker),) = rollouts.items()  # the config check allows one colocated engine
        invitation = wait_one(learner.open_weight_ring.remote(), "learner-0", "open the weight ring",
                              self.timeout_s)
        wait_all([learner.accept_weight_ring.remote(), worker.attach_weight_ring.remote(*invitation)],
                 ["learner-0", name], "attach the weight ring", self.timeout_s)


def receive_ring(address: tuple[str, int], authkey: bytes) -> tuple[Connection, list[torch.Tensor]]:
    """The engine's side of ``RingSender``: join its channel and map its ring into this process."""
    channel = Client(tuple(address), authkey=authkey)
    return channel, channel.recv()

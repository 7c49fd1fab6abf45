"""Colocated weight sync: a learner and a rollout engine in two processes on one GPU share a
ring of bucket buffers, so the weights move as device-to-device copies and never cross the host.

The ring is shared once (``share_ring`` → ``open_ring``: CUDA IPC handles for a GPU ring, shared
memory for a host ring, through ``torch.multiprocessing``'s reductions). Each sync then goes
through a duplex ``channel`` (a ``multiprocessing`` connection; anything with ``send`` and
``recv`` of small picklable messages):

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

from typing import Iterator, Mapping

import torch
from torch.multiprocessing.reductions import reduce_tensor

from kimivl_rl.infra.weight_sync import Bucket, bucket_bytes, decode_plan, encode_plan, flatten_bucket, unflatten_bucket


def new_ring(plan: list[Bucket], slots: int, device: torch.device | str) -> list[torch.Tensor]:
    """``slots`` byte buffers on ``device``, each as large as the plan's largest bucket."""
    size = max(bucket_bytes(bucket) for bucket in plan)
    return [torch.empty(size, dtype=torch.uint8, device=device) for _ in range(slots)]


def share_ring(ring: list[torch.Tensor]) -> list:
    """Picklable handles of the ring's buffers (for ``open_ring`` in the other process). A host
    ring must be in shared memory (``share_memory_``) first."""
    return [reduce_tensor(buffer) for buffer in ring]


def open_ring(handles: list) -> list[torch.Tensor]:
    """The other process's ring buffers, mapped into this one (no copy)."""
    return [rebuild(*args) for rebuild, args in handles]


def _expect(channel, index: int) -> None:
    """The other side's next message must be bucket ``index``: the two sides move in step."""
    got = channel.recv()
    if got != index:
        raise RuntimeError(f"weight ring out of step: expected bucket {index}, got {got!r}")


def _wait_for_device() -> None:
    """Copies are asynchronous on a GPU: the other process may only look once they are done."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def send_weights_through_ring(channel, tensors: Mapping[str, torch.Tensor], plan: list[Bucket],
                              ring: list[torch.Tensor]) -> int:
    """The sender's side of one sync; returns the bytes sent. ``plan`` must fit ``ring``."""
    channel.send(encode_plan(plan))
    for index, bucket in enumerate(plan):
        if index >= len(ring):
            _expect(channel, index - len(ring))  # that buffer's last bucket is copied out
        flatten_bucket(tensors, bucket, out=ring[index % len(ring)])
        _wait_for_device()
        channel.send(index)
    for index in range(max(0, len(plan) - len(ring)), len(plan)):
        _expect(channel, index)
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

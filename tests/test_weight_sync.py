"""Weight sync through ``CollectiveTransport``: the bucket plan and byte packing exactly, the
group protocol between threads, and the RL actors on a local Ray cluster (gloo: the code path
NCCL takes on GPU); and the shared ring of ``kimivl_rl.infra.ipc_weight_sync`` between processes."""
from __future__ import annotations

import io
import os
import signal
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from kimivl_rl.infra.ipc_weight_sync import new_ring, receive_weights_through_ring, send_weights_through_ring
from kimivl_rl.infra.weight_sync import (ALIGN, LOOPBACK, CollectiveTransport, TensorSlot, bucket_bytes,
                                   decode_plan, encode_plan, flatten_bucket, listen, new_weight_group,
                                   plan_buckets, receive_weights, send_weights, unflatten_bucket)


def mixed_tensors() -> dict[str, torch.Tensor]:
    """Odd sizes of every byte width, a scalar, an empty tensor and a non-contiguous view."""
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(10, generator=g),
            "b.weight": torch.randn(3, 5, generator=g).to(torch.bfloat16),
            "c.steps": torch.tensor(7, dtype=torch.int64),
            "d.big": torch.randn(100, generator=g),
            "e.mask": torch.tensor([True, False, True, True, False, False, True]),
            "f.half": torch.randn(2, 3, 10, generator=g).to(torch.float16),
            "g.empty": torch.zeros(0, 4),
            "h.transposed": torch.randn(4, 5, generator=g).t()}


def specs(tensors):
    return [(name, t.dtype, t.shape) for name, t in tensors.items()]


def test_bucket_plan_packs_in_order_aligned_within_the_cap():
    plan = plan_buckets(specs(mixed_tensors()), cap_bytes=256)
    assert plan == [
        [TensorSlot("a.weight", "float32", (10,), 0),            # bytes 0-40
         TensorSlot("b.weight", "bfloat16", (3, 5), 64),         # 64-94
         TensorSlot("c.steps", "int64", (), 128)],               # 128-136
        [TensorSlot("d.big", "float32", (100,), 0)],             # 400 > cap: alone
        [TensorSlot("e.mask", "bool", (7,), 0),                  # 0-7
         TensorSlot("f.half", "float16", (2, 3, 10), 64),        # 64-184
         TensorSlot("g.empty", "float32", (0, 4), 192)],         # 192-192
        [TensorSlot("h.transposed", "float32", (5, 4), 0)],      # 192 + 80 > cap: next bucket
    ]
    assert [bucket_bytes(b) for b in plan] == [136, 400, 192, 80]
    assert all(s.offset % ALIGN == 0 for b in plan for s in b)


def test_bucket_plan_edges():
    assert plan_buckets([], 100) == []
    # Exactly at the cap still fits; one byte over starts a new bucket.
    fits = plan_buckets([("x", torch.uint8, (64,)), ("y", torch.uint8, (36,))], 100)
    assert [[s.name for s in b] for b in fits] == [["x", "y"]]
    over = plan_buckets([("x", torch.uint8, (64,)), ("y", torch.uint8, (37,))], 100)
    assert [[s.name for s in b] for b in over] == [["x"], ["y"]]
    # Every tensor over the cap: one bucket each.
    assert len(plan_buckets([(str(i), torch.float32, (50,)) for i in range(3)], 100)) == 3


def test_flatten_unflatten_round_trip_keeps_names_dtypes_shapes_and_values():
    tensors = mixed_tensors()
    plan = plan_buckets(specs(tensors), cap_bytes=256)
    out = {}
    for bucket in plan:
        flat = flatten_bucket(tensors, bucket)
        assert flat.dtype == torch.uint8 and flat.shape == (bucket_bytes(bucket),)
        out.update(unflatten_bucket(flat, bucket))
    assert list(out) == list(tensors)
    for name, tensor in tensors.items():
        assert out[name].dtype == tensor.dtype and out[name].shape == tensor.shape, name
        assert torch.equal(out[name], tensor), name


def test_plan_survives_its_json_encoding():
    plan = plan_buckets(specs(mixed_tensors()), cap_bytes=256)
    assert decode_plan(encode_plan(plan)) == plan


def test_send_and_receive_over_a_gloo_group_on_loopback():
    """Rank 0 and two receivers (threads), several buckets: every receiver gets every tensor."""
    tensors = mixed_tensors()
    listener = listen(LOOPBACK)
    port = listener.getsockname()[1]

    def rank(r: int):
        group = new_weight_group(LOOPBACK, port, r, 3, "gloo", 30.0, listener if r == 0 else None)
        if r == 0:
            return send_weights(group, tensors, 256, "cpu")
        return {name: t.clone() for name, t in receive_weights(group, "cpu")}

    with ThreadPoolExecutor(3) as pool:
        sent, *received = pool.map(rank, range(3))
    assert sent == 136 + 400 + 192 + 80
    for got in received:
        assert list(got) == list(tensors)
        assert all(torch.equal(got[name], t) and got[name].dtype == t.dtype for name, t in tensors.items())


# ----------------------------------------------------------------------------- the RL actors

@pytest.fixture(scope="module")
def collective_setup(tmp_path_factory, tiny_model_dir, small_data_dir, ray_cluster):
    from transformers import AutoProcessor

    from kimivl_rl.data.rows import RowLoader
    from kimivl_rl.evaluation import generation_requests
    from kimivl_rl.system.actors import RLActors
    from test_rl_ray import rl_cfg

    # Small buckets: the tiny model's 8 MB go in many broadcasts, its embeddings alone.
    cfg = rl_cfg(tmp_path_factory.mktemp("collective"), tiny_model_dir, small_data_dir,
                 "cluster.weight_transport=collective", f"cluster.weight_bucket_bytes={256 * 1024}")
    prompts = RowLoader.prompts(cfg.data, cfg.rl.train_file)[:2]
    actors = RLActors.start(cfg, cfg.model.path)
    yield cfg, actors, prompts, generation_requests(prompts, AutoProcessor.from_pretrained(tiny_model_dir))
    actors.stop()


@pytest.mark.slow
def test_collective_sync_makes_rollout_logprobs_match_the_learner(collective_setup):
    from test_rl_ray import assert_rollouts_score_like_the_learner, learn_from_alternate_rewards

    cfg, actors, prompts, requests = collective_setup
    assert isinstance(actors.transport, CollectiveTransport)
    learn_from_alternate_rewards(actors, cfg, prompts, requests)
    with pytest.raises(AssertionError):  # the update moved the learner away from the engine
        assert_rollouts_score_like_the_learner(actors, cfg, prompts, requests)
    stats = actors.sync_weights(version=1)
    assert stats.version == 1 and actors.weights_version == 1
    assert_rollouts_score_like_the_learner(actors, cfg, prompts, requests)


@pytest.mark.slow
def test_restarted_rollout_worker_joins_a_new_group_and_gets_the_current_weights(collective_setup):
    """The new process was in no group and rank 0's old group has a dead member: recovery forms
    a new one, and later syncs go through it."""
    import ray

    from test_fault_tolerance import _pid
    from test_rl_ray import assert_rollouts_score_like_the_learner

    cfg, actors, prompts, requests = collective_setup
    assert actors.weights_version == 1  # set by the test above
    old = _pid(actors.rollouts[0])
    os.kill(old, signal.SIGKILL)
    actors.recover_rollout(0)
    assert _pid(actors.rollouts[0]) != old
    assert ray.get(actors.rollouts[0].__ray_call__.remote(lambda self: self.weights_version)) == 1
    assert_rollouts_score_like_the_learner(actors, cfg, prompts, requests)
    actors.sync_weights(version=2)
    assert_rollouts_score_like_the_learner(actors, cfg, prompts, requests)


# ----------------------------------------------------------------------------- the shared ring

def _ring_receiver(channel, ring, syncs: int) -> None:
    """The other process (handed the ring at its start): send back what each sync delivered."""
    for _ in range(syncs):
        received = io.BytesIO()
        # clones: torch.save refuses views of one buffer as several dtypes
        torch.save({name: t.clone() for name, t in receive_weights_through_ring(channel, ring, "cpu")},
                   received)
        channel.send(received.getvalue())  # bytes: tensors would be shared from a process that ends


@pytest.mark.parametrize("slots", [1, 2, 5])
def test_weights_cross_a_shared_ring_between_processes_in_step(slots):
    """A host ring in shared memory: the protocol and bucketing that a GPU ring (CUDA IPC, measured
    by bench/weight_sync.py --transport ipc) runs unchanged."""
    import multiprocessing

    tensors = mixed_tensors()
    plan = plan_buckets(specs(tensors), cap_bytes=256)  # 4 buckets: the ring is reused
    ring = [buffer.share_memory_() for buffer in new_ring(plan, slots, "cpu")]
    assert all(len(buffer) == max(bucket_bytes(b) for b in plan) for buffer in ring)
    context = multiprocessing.get_context("spawn")
    mine, theirs = context.Pipe()
    receiver = context.Process(target=_ring_receiver, args=(theirs, ring, 2))
    receiver.start()
    theirs.close()  # a receiver that dies then ends the sender's wait with EOFError
    try:
        for version in range(2):  # the ring outlives a sync
            sent = {name: t + version if t.dtype.is_floating_point else t for name, t in tensors.items()}
            assert send_weights_through_ring(mine, sent, plan, ring) == sum(map(bucket_bytes, plan))
            received = torch.load(io.BytesIO(mine.recv()), weights_only=True)
            assert list(received) == list(sent)
            for name, tensor in sent.items():
                assert received[name].dtype == tensor.dtype and torch.equal(received[name], tensor), name
    finally:
        receiver.join(timeout=60)
    assert receiver.exitcode == 0


def test_ring_out_of_step_is_an_error():
    class Replies:
        def send(self, message):
            pass

        def recv(self):
            return 7

    plan = plan_buckets(specs(mixed_tensors()), cap_bytes=256)
    with pytest.raises(RuntimeError, match="expected bucket 0, got 7"):
        send_weights_through_ring(Replies(), mixed_tensors(), plan, new_ring(plan, 1, "cpu"))

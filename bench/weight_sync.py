"""Weight sync time against model size, for random Qwen2.5-VL models of growing size, through
each transport of ``kimivl_rl/infra/weight_sync.py`` into a vLLM engine's in-place reload:

- object_store: weights -> Ray object store -> safetensors in shared memory -> reload;
- collective: a sender process (learner rank 0's side, without DeepSpeed) broadcasts them in
  buckets over a gloo group with the engine's worker, which streams them into the reload.

    .venv/bin/python bench/weight_sync.py [--sizes 128,256,512] [--transport object_store,collective]
                                          [--bucket-mb 512]

For each text hidden size and transport it prints parameters, bytes, seconds per sync (best of
3), GB/s and the speed-up over object_store measured in the same run (when both are asked for);
the restart columns are a fresh engine start on new weights, what a sync-by-restart costs.

Colocated on one GPU (no vLLM: a torch receiver process), through ``kimivl_rl/infra/ipc_weight_sync.py``:

- ipc: the learner's buckets in a ring of GPU buffers shared as CUDA IPC handles, which the
  receiver copies out and loads into its own parameters (device-to-device copies only);
- host: the same ring in pinned shared host memory (a host-staged copy: device -> host -> device),
  the baseline.

    python bench/weight_sync.py --transport ipc,host [--models 1.5b,3b,7b] [--bucket-mb 512]

For each Qwen2.5 language-model size (bf16, random) and transport it prints the bytes, seconds per
sync (best of 3, the receiver's parameters loaded), GB/s and the speed-up over host (when both are
asked for), and whether the receiver's parameters match the sender's.
"""
from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import time
from pathlib import Path

import torch

from kimivl_rl.infra.ipc_weight_sync import new_ring, receive_weights_through_ring, send_weights_through_ring
from kimivl_rl.infra.weight_sync import LOOPBACK, listen, new_weight_group, plan_buckets, send_weights

TIMEOUT_S = 600.0


class _Sender:
    """Learner rank 0's side of CollectiveTransport, in a process of its own."""

    def __init__(self, weights, bucket_bytes: int):
        self.weights, self.bucket_bytes = weights, bucket_bytes

    def open(self) -> int:
        self.listener = listen(LOOPBACK)
        return self.listener.getsockname()[1]

    def join(self, port: int) -> None:
        self.group = new_weight_group(LOOPBACK, port, 0, 2, "gloo", TIMEOUT_S, self.listener)

    def send(self) -> int:
        return send_weights(self.group, self.weights, self.bucket_bytes, "cpu")


def object_store_sync(engine, weights, _bucket_bytes):
    import ray

    return lambda: engine.load_weights(ray.get(ray.put(weights)))


def collective_sync(engine, weights, bucket_bytes):
    import ray

    sender = ray.remote(_Sender).options(num_cpus=0).remote(weights, bucket_bytes)
    port = ray.get(sender.open.remote())
    joined = sender.join.remote(port)  # blocks until the engine's worker joins too
    engine.init_weight_update_group(LOOPBACK, port, 1, 2, "gloo", TIMEOUT_S)
    ray.get(joined)

    def sync():
        sent = sender.send.remote()
        engine.receive_weights()
        ray.get(sent)
    return sync


TRANSPORTS = {"object_store": object_store_sync, "collective": collective_sync}
RING_DEVICES = {"ipc": "cuda", "host": "cpu"}  # colocated transports: where the ring lies
RING_SLOTS = 2  # one bucket filled while the receiver copies the other out
# Qwen2.5 language models: hidden, intermediate, layers, attention heads, key-value heads, tied
QWEN2_5 = {"1.5b": (1536, 8960, 28, 12, 2, True), "3b": (2048, 11008, 36, 16, 2, True),
           "7b": (3584, 18944, 28, 28, 4, False)}
VOCABULARY = 151936


def qwen_weight_specs(size: str) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(name, dtype, shape) of a Qwen2.5 language model's weights, in checkpoint order, bf16."""
    hidden, inner, layers, heads, kv_heads, tied = QWEN2_5[size]
    kv = hidden // heads * kv_heads
    shapes = [("model.embed_tokens.weight", (VOCABULARY, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(p + "self_attn.q_proj.weight", (hidden, hidden)), (p + "self_attn.q_proj.bias", (hidden,)),
                   (p + "self_attn.k_proj.weight", (kv, hidden)), (p + "self_attn.k_proj.bias", (kv,)),
                   (p + "self_attn.v_proj.weight", (kv, hidden)), (p + "self_attn.v_proj.bias", (kv,)),
                   (p + "self_attn.o_proj.weight", (hidden, hidden)),
                   (p + "mlp.gate_proj.weight", (inner, hidden)), (p + "mlp.up_proj.weight", (inner, hidden)),
                   (p + "mlp.down_proj.weight", (hidden, inner)),
                   (p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,))]
    shapes += [("model.norm.weight", (hidden,))] + ([] if tied else [("lm_head.weight", (VOCABULARY, hidden))])
    return [(name, torch.bfloat16, shape) for name, shape in shapes]


def pin(buffer: torch.Tensor) -> torch.Tensor:
    """Page-lock a shared host buffer in this process, so copies to and from the GPU run at the
    link's speed (pinned memory from torch's allocator cannot be shared between processes)."""
    cudart = torch.cuda.cudart()
    error = cudart.cudaHostRegister(buffer.data_ptr(), buffer.numel(), 0)
    if error != cudart.cudaError.success:
        raise RuntimeError(f"cudaHostRegister failed: {error}")
    return buffer


def unpin(buffer: torch.Tensor) -> None:
    """Undo ``pin`` before the buffer is freed: a later buffer at the same address would fail to
    register ("resource already mapped")."""
    torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())


def checksum(tensors: dict[str, torch.Tensor]) -> float:
    return sum(float(t.float().sum()) for t in tensors.values())


def _torch_receiver(channel, control, specs, ring, host: bool) -> None:
    """The rollout side, in a process of its own: its parameters, loaded from the ring on demand."""
    params = {name: torch.empty(shape, dtype=dtype, device="cuda") for name, dtype, shape in specs}
    if host:
        ring = [pin(buffer) for buffer in ring]
    control.send("ready")
    while control.recv() == "sync":
        for name, tensor in receive_weights_through_ring(channel, ring, "cuda"):
            params[name].copy_(tensor)
        torch.cuda.synchronize()
        control.send(checksum(params))


def colocated_seconds(transport: str, weights: dict[str, torch.Tensor], bucket_bytes: int) -> tuple[float, bool]:
    """Best of 3 syncs into a torch receiver process on the same GPU, and whether it matches."""
    specs = [(name, t.dtype, tuple(t.shape)) for name, t in weights.items()]
    plan = plan_buckets(specs, bucket_bytes)
    ring = new_ring(plan, RING_SLOTS, RING_DEVICES[transport])
    if transport == "host":
        ring = [pin(buffer.share_memory_()) for buffer in ring]
    context = multiprocessing.get_context("spawn")
    (channel, their_channel), (control, their_control) = context.Pipe(), context.Pipe()
    receiver = context.Process(target=_torch_receiver, daemon=True,
                               args=(their_channel, their_control, specs, ring, transport == "host"))
    receiver.start()
    assert control.recv() == "ready"

    received = []  # the receiver's checksum after each sync

    def sync():
        control.send("sync")
        send_weights_through_ring(channel, weights, plan, ring)
        received.append(control.recv())
    sync()  # warm-up: the receiver's first touch of the ring
    seconds = best_seconds(sync)
    control.send("stop")
    receiver.join()
    if transport == "host":
        for buffer in ring:
            unpin(buffer)
    expected = checksum(weights)
    return seconds, all(abs(value - expected) <= 1e-6 * abs(expected) for value in received)


def colocated_main(args, transports: list[str]) -> None:
    print(f"{'model':>6} {'params':>14} {'GB':>6} {'transport':>9} {'sync s':>8} {'GB/s':>7} {'vs host':>8} match")
    for size in args.models.split(","):
        torch.manual_seed(0)
        weights = {name: torch.randn(shape, dtype=dtype, device="cuda") for name, dtype, shape in qwen_weight_specs(size)}
        params = sum(t.numel() for t in weights.values())
        gigabytes = sum(t.nbytes for t in weights.values()) / 1e9
        results = {name: colocated_seconds(name, weights, args.bucket_mb * 2**20) for name in transports}
        for name, (seconds, match) in results.items():
            ratio = f"{results['host'][0] / seconds:.2f}x" if "host" in results else "-"
            print(f"{size:>6} {params:>14,} {gigabytes:>6.2f} {name:>9} {seconds:>8.4f} "
                  f"{gigabytes / seconds:>7.1f} {ratio:>8} {match}", flush=True)
        del weights
        torch.cuda.empty_cache()


def best_seconds(sync, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        sync()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="128,256,512")
    parser.add_argument("--transport", default="object_store,collective",
                        help=f"comma-separated, of {', '.join(TRANSPORTS)}, or of {', '.join(RING_DEVICES)}")
    parser.add_argument("--bucket-mb", type=int, default=512, help="collective, ipc, host: bucket cap in MiB")
    parser.add_argument("--models", default="1.5b,3b,7b", help=f"ipc, host: of {', '.join(QWEN2_5)}")
    args = parser.parse_args()
    transports = args.transport.split(",")
    if set(transports) <= set(RING_DEVICES):
        colocated_main(args, transports)
    elif set(transports) <= set(TRANSPORTS):
        engine_main(args, transports)
    else:
        parser.error(f"choose transports from {sorted(TRANSPORTS)} or from {sorted(RING_DEVICES)}")


def engine_main(args, transports: list[str]) -> None:
    import ray
    from safetensors.torch import load_file

    from kimivl_rl.models.tiny import TinyVLMSpec, build_tiny_vlm
    from kimivl_rl.prepare import tiny_corpus
    from kimivl_rl.rollout.vllm_engine import EngineOptions, VLLMEngine

    ray.init(num_cpus=2, include_dashboard=False)
    print(f"{'hidden':>6} {'params':>10} {'MB':>8} {'transport':>12} {'sync s':>8} {'GB/s':>6} "
          f"{'vs object_store':>15} {'restart s':>9} {'restart/sync':>12}")
    for hidden in map(int, args.sizes.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            spec = TinyVLMSpec(text_hidden=hidden, text_intermediate=4 * hidden, text_heads=hidden // 64,
                               vision_hidden=128)
            model_dir = build_tiny_vlm(Path(tmp) / "m", spec, tiny_corpus())
            weights = {k: v + 0.01 for k, v in load_file(model_dir / "model.safetensors").items()}
            size = sum(t.numel() * t.element_size() for t in weights.values())
            params = sum(t.numel() for t in weights.values())
            started = time.perf_counter()
            engine = VLLMEngine(EngineOptions(model=str(model_dir), dtype="float32"))
            restart = time.perf_counter() - started
            seconds = {name: best_seconds(TRANSPORTS[name](engine, weights, args.bucket_mb * 2**20))
                       for name in transports}
            engine.shutdown()
            for name, sync in seconds.items():
                ratio = f"{seconds['object_store'] / sync:.2f}x" if "object_store" in seconds else "-"
                print(f"{hidden:>6} {params:>10,} {size / 1e6:>8.1f} {name:>12} {sync:>8.3f} "
                      f"{size / sync / 1e9:>6.2f} {ratio:>15} {restart:>9.1f} {restart / sync:>11.0f}x")


if __name__ == "__main__":
    main()

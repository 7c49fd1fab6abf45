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
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from kimivl_rl.infra.weight_sync import LOOPBACK, listen, new_weight_group, send_weights

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


def best_seconds(sync, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        sync()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    import ray
    from safetensors.torch import load_file

    from kimivl_rl.models.tiny import TinyVLMSpec, build_tiny_vlm
    from kimivl_rl.rollout.vllm_engine import EngineOptions, VLLMEngine

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="128,256,512")
    parser.add_argument("--transport", default="object_store,collective",
                        help=f"comma-separated, of {', '.join(TRANSPORTS)}")
    parser.add_argument("--bucket-mb", type=int, default=512, help="collective: bucket cap in MiB")
    args = parser.parse_args()
    transports = args.transport.split(",")
    unknown = set(transports) - set(TRANSPORTS)
    if unknown:
        parser.error(f"unknown transport(s) {sorted(unknown)}; choose from {sorted(TRANSPORTS)}")
    ray.init(num_cpus=2, include_dashboard=False)
    print(f"{'hidden':>6} {'params':>10} {'MB':>8} {'transport':>12} {'sync s':>8} {'GB/s':>6} "
          f"{'vs object_store':>15} {'restart s':>9} {'restart/sync':>12}")
    for hidden in map(int, args.sizes.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            spec = TinyVLMSpec(text_hidden=hidden, text_intermediate=4 * hidden, text_heads=hidden // 64,
                               vision_hidden=128)
            model_dir = build_tiny_vlm(Path(tmp) / "m", spec)
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

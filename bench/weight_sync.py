"""Weight sync time against model size: learner weights -> Ray object store -> vLLM in-place
reload (the path ``ObjectStoreTransport`` takes), for random Qwen2.5-VL models of growing size.

    .venv/bin/python bench/weight_sync.py [--sizes 128,256,512]

For each text hidden size it prints parameters, bytes, seconds per sync and GB/s; the
baseline row is a plain ``save_pretrained`` + fresh engine start, what a sync-by-restart costs.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    import ray
    from safetensors.torch import load_file

    from kimivl_rl.models.tiny import TinyVLMSpec, build_tiny_vlm
    from kimivl_rl.rollout.vllm_engine import EngineOptions, VLLMEngine

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="128,256,512")
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False)
    print(f"{'hidden':>6} {'params':>10} {'MB':>8} {'sync s':>8} {'GB/s':>6} {'restart s':>9} {'restart/sync':>12}")
    for hidden in map(int, args.sizes.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            spec = TinyVLMSpec(text_hidden=hidden, text_intermediate=4 * hidden, text_heads=hidden // 64,
                               vision_hidden=128)
            model_dir = build_tiny_vlm(Path(tmp) / "m", spec)
            weights = {k: v + 0.01 for k, v in load_file(model_dir / "model.safetensors").items()}
            size = sum(t.numel() * t.element_size() for t in weights.values())
            started = time.perf_counter()
            engine = VLLMEngine(EngineOptions(model=str(model_dir), dtype="float32"))
            restart = time.perf_counter() - started
            times = []
            for _ in range(3):
                started = time.perf_counter()
                engine.load_weights(ray.get(ray.put(weights)))
                times.append(time.perf_counter() - started)
            engine.shutdown()
            sync = min(times)
            params = sum(t.numel() for t in weights.values())
            print(f"{hidden:>6} {params:>10,} {size / 1e6:>8.1f} {sync:>8.3f} {size / sync / 1e9:>6.2f} "
                  f"{restart:>9.1f} {restart / sync:>11.0f}x")


if __name__ == "__main__":
    main()

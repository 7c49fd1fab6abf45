"""SFT learner throughput: packed sequences (this project) vs padded batches, same data, same
model, same number of examples, forward + backward + AdamW step, in one run. Packs run twice:
with transformers' SDPA and its dense block-diagonal mask, and with ``packed_sdpa`` (each
example's own block only, what the CPU trainers use).

    .venv/bin/python bench/sft_throughput.py [--examples 256] [--pack-len 1024] [--batch 16]

Prints real (non-padding) tokens/s, padding waste, and each packed/padded ratio. Runs on the
built-in tiny model on CPU; pass --model for another checkpoint (on GPU with --device cuda).
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def padded_batches(encoded, batch: int, pad_id: int):
    """Batches of ``batch`` examples padded to the longest; labels -100 on padding."""
    from kimivl_rl.training.packing import IGNORE_INDEX

    for start in range(0, len(encoded), batch):
        chunk = encoded[start:start + batch]
        width = max(len(e) for e in chunk)
        ids = torch.full((len(chunk), width), pad_id)
        labels = torch.full((len(chunk), width), IGNORE_INDEX)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, e in enumerate(chunk):
            ids[i, :len(e)], labels[i, :len(e)], mask[i, :len(e)] = e.input_ids, e.labels, 1
        yield {"input_ids": ids, "attention_mask": mask}, labels, len(chunk) * width


def packed_batches(encoded, pack_len: int, family):
    from kimivl_rl.training.packing import collate_pack, plan_packs

    for pack in plan_packs([len(e) for e in encoded], pack_len, seed=0):
        batch = collate_pack([encoded[i] for i in pack], family)
        labels = batch.pop("labels")
        yield batch, labels, pack_len


def run(model, batches, device) -> tuple[float, int, int]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    real = slots = 0
    started = time.perf_counter()
    for inputs, labels, width in batches:
        inputs = {k: v.to(device) for k, v in inputs.items()}
        logits = model(**inputs, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(device),
                               ignore_index=-100)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mask = inputs.get("attention_mask")
        real += int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
        slots += width
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started, real, slots


def main() -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from kimivl_rl.config import load_config
    from kimivl_rl.data.rows import RowLoader
    from kimivl_rl.models.families import family_of
    from kimivl_rl.models.loading import use_language_model_attention
    from kimivl_rl.models.packed_attention import PACKED_SDPA
    from kimivl_rl.prepare import ensure_data, ensure_model, with_absolute_paths
    from kimivl_rl.sft.encode import encode_example

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model")
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--pack-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    cfg = with_absolute_paths(load_config("configs/tiny.yaml"))
    model_dir = args.model or ensure_model(cfg)
    data_dir = ensure_data(cfg, progress=False)
    processor = AutoProcessor.from_pretrained(model_dir)
    device = torch.device(args.device)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, attn_implementation="sdpa").to(device)
    # Text-only rows: padded batches of images would need per-row pixel bookkeeping.
    rows = [r for r in RowLoader(data_dir / "long_cot" / "train.jsonl").load_all() if not r.images]
    family = family_of(model)
    encoded = [encode_example(r, processor, family) for r in rows[: args.examples]]
    pad_id = processor.tokenizer.pad_token_id
    variants = (("padded", "sdpa", padded_batches(encoded, args.batch, pad_id)),
                ("packed, dense mask", "sdpa", packed_batches(encoded, args.pack_len, family)),
                ("packed, packed_sdpa", PACKED_SDPA, packed_batches(encoded, args.pack_len, family)))
    results = {}
    for name, attention, batches in variants:
        use_language_model_attention(model, attention)
        seconds, real, slots = run(model, list(batches), device)
        results[name] = real / seconds
        print(f"{name:20s} {real} real tokens in {seconds:6.2f}s: {real / seconds:9.1f} tokens/s, "
              f"padding waste {100 * (1 - real / slots):5.1f}%")
    for name in list(results)[1:]:
        print(f"{name} / padded: {results[name] / results['padded']:.2f}x real tokens/s "
              f"({len(encoded)} long-CoT examples, batch {args.batch} vs packs of {args.pack_len})")


if __name__ == "__main__":
    main()

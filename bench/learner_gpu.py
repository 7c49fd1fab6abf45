"""Learner throughput and MFU on one GPU for a realistic-size random model (no download).

    export TORCH_CUDA_ARCH_LIST=9.0   # DeepSpeed's op builder cannot parse 9.0a
    torchrun --nproc_per_node 1 bench/learner_gpu.py [--seq 8192] [--steps 10] [--accum 4]

Shape: Qwen2.5-1.5B's language model (28 layers, hidden 1536, 152K vocabulary), bf16, one
packed sequence of --seq tokens per step (documents of --doc tokens, positions restarting).
Variants, measured in the same run:
  plain      torch, fused AdamW, full-vocabulary float logits (the baseline)
  deepspeed  kimivl_rl.engine (DeepSpeed ZeRO-2, bf16), same loss
  ds+chunked the same engine, cross-entropy computed in vocabulary-projection chunks
Model FLOPs per token: 6·N + 6·layers·hidden·seq; MFU divides by a bf16 8192³ matmul rate
measured in this run.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def matmul_peak_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    return 20 * 2 * 8192**3 / (time.perf_counter() - started) / 1e12


def build_model(attention: str):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         max_position_embeddings=32768, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(device="cuda", dtype=torch.bfloat16)
    model.config._attn_implementation = attention
    return model


def batch(seq: int, doc: int, vocab: int) -> dict:
    ids = torch.randint(0, vocab, (1, seq), device="cuda")
    positions = (torch.arange(seq, device="cuda") % doc)[None]
    return {"input_ids": ids, "position_ids": positions}


def full_loss(model, inputs) -> torch.Tensor:
    logits = model(**inputs, use_cache=False).logits[0, :-1]
    return F.cross_entropy(logits.float(), inputs["input_ids"][0, 1:])


def _chunk_ce(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy((hidden @ weight.t()).float(), targets, reduction="sum")


def chunked_loss(model, inputs, chunk: int = 2048) -> torch.Tensor:
    """Cross-entropy without the full (tokens x vocabulary) float logits: each chunk's logits
    are made, reduced and recomputed in backward (activation checkpointing)."""
    core = model.module.model if hasattr(model, "module") else model.model
    head = (model.module if hasattr(model, "module") else model).lm_head.weight
    hidden = core(**inputs, use_cache=False).last_hidden_state[0, :-1]
    targets = inputs["input_ids"][0, 1:]
    total = sum(checkpoint(_chunk_ce, hidden[i:i + chunk], head, targets[i:i + chunk], use_reentrant=False)
                for i in range(0, hidden.shape[0], chunk))
    return total / targets.numel()


def timed(step, steps: int) -> float:
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--doc", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--attention", default="sdpa", help="sdpa or flex_attention")
    parser.add_argument("--variants", default="plain,deepspeed,ds+chunked")
    parser.add_argument("--accum", type=int, default=1,
                        help="micro-batches (packed sequences) per optimizer step")
    parser.add_argument("--zero", type=int, default=2, help="ZeRO stage of the DeepSpeed variants")
    args = parser.parse_args()
    peak = matmul_peak_tflops()
    results = {}
    variants = args.variants.split(",")
    for variant in variants:
        model = build_model(args.attention)
        cfg = model.config
        n_params = sum(p.numel() for p in model.parameters())
        flops_per_token = 6 * n_params + 6 * cfg.num_hidden_layers * cfg.hidden_size * args.seq
        inputs = batch(args.seq, args.doc, cfg.vocab_size)
        if variant == "plain":
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

            def step():
                for _ in range(args.accum):
                    (full_loss(model, inputs) / args.accum).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        else:
            from kimivl_rl.engine import build_engine

            engine = build_engine(model, lambda s: 1e-5, zero_stage=args.zero,
                                  grad_accum_steps=args.accum, bf16=True)
            loss_fn = full_loss if variant == "deepspeed" else chunked_loss

            def step():
                for _ in range(args.accum):  # the engine steps the optimizer on the last one
                    engine.backward(loss_fn(engine, inputs))
                    engine.step()
        seconds = timed(step, args.steps)
        tokens_per_s = args.seq * args.accum / seconds
        mfu = tokens_per_s * flops_per_token / (peak * 1e12)
        results[variant] = tokens_per_s
        print(f"{variant:11s} {tokens_per_s:9.0f} tokens/s  MFU {100 * mfu:5.1f}%  "
              f"peak mem {torch.cuda.max_memory_allocated() / 2**30:5.1f} GiB", flush=True)
        del model
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    print(f"bf16 matmul peak {peak:.0f} TFLOP/s; params {n_params / 1e9:.2f}B; seq {args.seq}, "
          f"docs of {args.doc}, attention {args.attention}, {args.accum} micro-batch(es) per "
          f"optimizer step, ZeRO-{args.zero}")
    for variant in variants[1:]:
        print(f"{variant} / {variants[0]}: {results[variant] / results[variants[0]]:.2f}x")


if __name__ == "__main__":
    main()

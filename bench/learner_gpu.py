r"""Learner throughput and MFU on one GPU for a realistic-size random model (no download).

    export TORCH_CUDA_ARCH_LIST=9.0   # DeepSpeed's op builder cannot parse 9.0a
    torchrun --nproc_per_node 1 bench/learner_gpu.py [--shape lm|vlm|kimi|kimi_vl] [--seq 8192] [--doc 1024]
        [--attention flex_attention] [--variants plain,deepspeed,ds+chunked,ds+fused] [--accum 4]
        [--compile] [--grad-ckpt] [--steps 10] [--rl [--loss kimi_pmd]]
        [--vision-attention loop,varlen] [--experts eager,grouped_mm]
    # a smoke check on CPU (tiny shapes, float32); tests/test_bench_smoke.py runs every command
    # of bench/README.md so, with sdpa (FlexAttention has no backward on CPU):
    torchrun --nproc_per_node 1 bench/learner_gpu.py --tiny --shape vlm --seq 256 --doc 128 \
        --image 112 --steps 1 --accum 2 --compile --vision-attention loop,varlen

Shapes, bf16, random init; a micro-batch is one packed sequence of --seq tokens made of documents
of --doc tokens, each with its own positions from 0 (block-diagonal attention):
  lm   Qwen2.5-1.5B's language model (28 layers, hidden 1536, 152K vocabulary); every token but
       a document's first is a target
  vlm  Qwen2.5-VL-3B: its language model (36 layers, hidden 2048, 152K vocabulary, tied) and
       vision encoder (32 blocks, hidden 1280). Each document is an --image x --image picture
       (448: 1024 patches of 14x14, 256 tokens after the 2x2 merge; random pixel values shaped
       as the processor's) and then text, packed by kimivl_rl.training.packing with the model's
       multimodal rope positions; only text tokens are targets
  kimi the Kimi K2.5 architecture at Kimi-VL-A3B's sizes, 8 of its 27 language layers (one
       H200 holds the optimizer states of about 6B parameters): MoonViT (27 blocks, hidden
       1152) and a DeepSeek-V3-style language model (hidden 2048, MLA with a 512-wide latent,
       a dense first layer, then 64 routed experts of which 6 per token plus 2 shared, 164K
       vocabulary); documents as for vlm, through kimivl_rl.models.families.kimi_k25
  kimi_vl the same sizes in Kimi-VL's own architecture (kimivl_rl.models.families.kimi_vl_model:
       MoonViT with fused wqkv and the published names, the projector, transformers' DeepSeek-V3),
       what a published Kimi-VL-A3B checkpoint loads into
Variants, measured in the same run:
  plain      torch, fused AdamW, full-vocabulary float logits (the baseline)
  deepspeed  kimivl_rl.training.engine (DeepSpeed ZeRO-2, bf16), same loss
  ds+chunked the same engine, cross-entropy in checkpointed chunks of the vocabulary projection
             (each chunk's logits made again in backward)
  ds+fused   the same engine, kimivl_rl.training.linear_cross_entropy (each chunk's gradients made in the
             forward: no logits made again)
--rl measures the RL update instead, beside ds+fused (the SFT path) in the same run: per
optimizer step, log π_old of every micro-batch without gradients, then the --loss update
(kimivl_rl.rl.losses) on each, every document one response with a random advantage:
  rl+full     response log-probs from full-vocabulary float logits (the learner's former path)
  rl+chunked  kimivl_rl.training.linear_cross_entropy.causal_lm_target_logprobs (the learner's path)
--attention is the language model's: sdpa (a dense block-diagonal mask) or flex_attention
(skips the blocks between documents). transformers declares no FlexAttention for Qwen2.5-VL, so
kimivl_rl.models.loading falls back to SDPA there; this bench sets it on the language model
after building (same loss as SDPA).
--vision-attention (vlm), each measured with every variant, the ratio printed:
  loop    transformers' vision attention without flash-attn: one SDPA call per window or image
  varlen  kimivl_rl.models.families.qwen2_5_vl_vision (what kimivl_rl.models.loading installs with
          FlexAttention): one FlexAttention call per block over all windows or images (on CPU
          one SDPA call with a block-diagonal mask)
--experts (kimi, kimi_vl), each measured with every variant, the ratio printed: transformers' experts
implementation, eager (a Python loop over the experts that received tokens) or grouped_mm (one
grouped GEMM per projection).
--compile compiles each decoder layer of the language model on its own (regional compilation,
as torchtitan does): fused elementwise kernels for RMSNorm, SwiGLU and RoPE; with varlen, each
vision block too (kimivl_rl.models.loading.compile_decoder_layers). --grad-ckpt recomputes each
layer's activations in backward, as the production configs do.

Model FLOPs of a micro-batch: 6·N_body per sequence token (N_body: the language model without
its embedding) + 6·N_head per target token (the vocabulary projection; the variants with full
logits also project the non-targets, uncounted) + 6·layers·hidden·context per sequence token
(causal attention) + for vlm 6·N_vision per image patch, where the merger's MLP counts
6·N_merger per merged token instead (vision attention, about 2% of the vision FLOPs at 448
pixels, is not counted). For kimi and kimi_vl, N_body counts active parameters: of each layer's routed
experts only the 6 of 64 a token goes through. Recomputation (--grad-ckpt) is not counted. An RL update
counts 4/3 of that: its old log-probs pass is a forward (2 of the 6 FLOPs per parameter). MFU divides by a bf16
8192³ matmul rate measured in this run; it is printed with context = --seq (the issue's
formula) and, in parentheses, context = --doc (the attention the block-diagonal mask leaves to
compute).
"""
from __future__ import annotations

import argparse
import gc
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import (Kimi_K25Config, Kimi_K25ForConditionalGeneration, Qwen2_5_VLConfig,
                          Qwen2_5_VLForConditionalGeneration, Qwen2Config, Qwen2ForCausalLM)

from kimivl_rl.training.linear_cross_entropy import (causal_lm_loss_sum, causal_lm_target_logprobs,
                                           loss_position_hidden, target_rows)
from kimivl_rl.models.loading import compile_decoder_layers, language_model, use_language_model_attention
from kimivl_rl.models.families.qwen2_5_vl_vision import use_varlen_vision_attention
from kimivl_rl.models.families import family_of, inner_model
from kimivl_rl.models.families.kimi_vl_model import KimiVLConfig, KimiVLForConditionalGeneration
from kimivl_rl.training.packing import IGNORE_INDEX, Encoded, collate_pack
from kimivl_rl.rl.losses import LossConfig, get_loss, pad_rows

LM_TEXT = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
               num_attention_heads=12, num_key_value_heads=2)
VLM_TEXT = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                num_attention_heads=16, num_key_value_heads=2)
VLM_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                  out_hidden_size=2048, fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2)
TINY_TEXT = dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, bos_token_id=0, eos_token_id=0)
TINY_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                   fullatt_block_indexes=[1])
TINY_TOKEN_IDS = dict(vision_start_token_id=4092, vision_end_token_id=4093, image_token_id=4094,
                      video_token_id=4095)
KIMI_TEXT = dict(vocab_size=163840, hidden_size=2048, intermediate_size=11264, num_hidden_layers=8,
                 num_attention_heads=16, num_key_value_heads=16, q_lora_rank=None,
                 kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
                 first_k_dense_replace=1, n_routed_experts=64, num_experts_per_tok=6,
                 n_shared_experts=2, moe_intermediate_size=1408)
KIMI_VISION = dict(hidden_size=1152, num_hidden_layers=27, num_attention_heads=16,
                   intermediate_size=4304)
TINY_KIMI_TEXT = dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, q_lora_rank=None,
                      kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32,
                      first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2,
                      n_shared_experts=1, moe_intermediate_size=32)
TINY_KIMI_VISION = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128)
# Kimi-VL-A3B's <|media_start|>, <|media_end|> and <|media_pad|>.
KIMI_VL_TOKEN_IDS = dict(vision_start_token_id=163602, vision_end_token_id=163604, image_token_id=163605)
KIMI_SHAPES = ("kimi", "kimi_vl")
EXPERTS = ("eager", "grouped_mm")
LOSS_CHUNK = 2048
RL_FLOPS = 4 / 3  # an RL update's model FLOPs per training step's (module docstring)
SFT_VARIANTS, RL_VARIANTS = "plain,deepspeed,ds+chunked,ds+fused", "ds+fused,rl+full,rl+chunked"
VISION_ATTENTION = ("loop", "varlen")


@dataclass
class Batch:
    inputs: dict[str, torch.Tensor]  # model inputs, on the device
    targets: torch.Tensor            # (seq - 1,): the next token, or IGNORE_INDEX (no target)
    rows: torch.Tensor               # positions with a target, found on the host (no sync)
    patches: int                     # image patches, before the merge


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    n = 8192 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    started = time.perf_counter()
    for _ in range(20):
        a @ b
    sync(device)
    return 20 * 2 * n**3 / (time.perf_counter() - started) / 1e12


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_model(args, device: torch.device, dtype: torch.dtype, option: str | None = None):
    """The shape's model; ``option`` is its vision attention (vlm) or experts (kimi, kimi_vl)."""
    if args.shape == "lm":
        cls, config = Qwen2ForCausalLM, Qwen2Config(**(TINY_TEXT if args.tiny else LM_TEXT),
                                                    max_position_embeddings=32768,
                                                    tie_word_embeddings=True)
    elif args.shape == "kimi":
        cls, config = Kimi_K25ForConditionalGeneration, kimi_config(args.tiny)
    elif args.shape == "kimi_vl":
        cls, config = KimiVLForConditionalGeneration, kimi_vl_config(args.tiny)
    else:
        cls, config = Qwen2_5_VLForConditionalGeneration, vlm_config(args.tiny)
    torch.manual_seed(0)
    with torch.device(device):
        model = cls._from_config(config, dtype=dtype)
    use_language_model_attention(model, args.attention)  # as kimivl_rl's loader does
    if args.shape in KIMI_SHAPES:
        # The Kimi wrappers declare none; their DeepSeek-V3 language model reads this per call.
        language_model(model).config._experts_implementation = option
    elif option == "varlen" and not use_varlen_vision_attention(model):
        raise ValueError("--vision-attention varlen: the model has no Qwen2.5-VL vision encoder")
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def vlm_config(tiny: bool) -> Qwen2_5_VLConfig:
    text = TINY_TEXT if tiny else VLM_TEXT
    half = text["hidden_size"] // text["num_attention_heads"] // 2  # 64 in Qwen2.5-VL-3B
    rope = {"rope_type": "default", "rope_theta": 1000000.0,  # mrope_section [16, 24, 24]
            "mrope_section": [half // 4, 3 * half // 8, 3 * half // 8]}
    vision = dict(TINY_VISION if tiny else VLM_VISION, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=112)
    return Qwen2_5_VLConfig(
        text_config=dict(text, max_position_embeddings=128000, rms_norm_eps=1e-6,
                         rope_parameters=rope),
        vision_config=vision, tie_word_embeddings=True, **(TINY_TOKEN_IDS if tiny else {}))


def kimi_text(tiny: bool) -> dict:
    """The language model of both Kimi shapes, with the tiny Kimi model's rope and routing."""
    from kimivl_rl.models.families.kimi_k25_tiny import ROPE

    return dict(TINY_KIMI_TEXT if tiny else KIMI_TEXT, model_type="deepseek_v3",
                rope_interleave=True, rope_parameters=ROPE, max_position_embeddings=4096,
                n_group=1, topk_group=1, norm_topk_prob=True, topk_method="noaux_tc",
                scoring_func="sigmoid", tie_word_embeddings=False)


def kimi_vl_config(tiny: bool) -> KimiVLConfig:
    """The kimi_vl shape: Kimi-VL-A3B's sizes (module docstring) in its own config."""
    vision = TINY_KIMI_VISION if tiny else KIMI_VISION
    ids = TINY_TOKEN_IDS if tiny else KIMI_VL_TOKEN_IDS
    markers = {k: ids[k] for k in ("vision_start_token_id", "vision_end_token_id")}  # for vlm_batch
    return KimiVLConfig(text_config=kimi_text(tiny), vision_config=dict(
        vision, patch_size=14, merge_kernel_size=[2, 2], init_pos_emb_height=64, init_pos_emb_width=64),
        media_placeholder_token_id=ids["image_token_id"], tie_word_embeddings=False, **markers)


def kimi_config(tiny: bool) -> Kimi_K25Config:
    """The kimi shape (module docstring)."""
    text = kimi_text(tiny)
    vision = dict(TINY_KIMI_VISION if tiny else KIMI_VISION, patch_size=14,
                  merge_kernel_size=[2, 2])
    return Kimi_K25Config(text_config=text, vision_config=vision,
                          projection_hidden_size=vision["hidden_size"], tie_word_embeddings=False,
                          **(TINY_TOKEN_IDS if tiny else {}))


def lm_batch(seq: int, doc: int, vocab: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (1, seq))
    labels = ids.clone()
    labels[0, ::doc] = IGNORE_INDEX  # a document's first token is not predicted from another's
    return {"input_ids": ids, "position_ids": (torch.arange(seq) % doc)[None], "labels": labels}


def vlm_batch(model, seq: int, doc: int, image: int) -> dict[str, torch.Tensor]:
    """Documents of one image (vision start, image pads, vision end) then text, as
    kimivl_rl.training.packing packs SFT and RL sequences."""
    config, vision = model.config, model.config.vision_config
    side = image // vision.patch_size
    grid = torch.tensor([[1, side, side]])
    image_tokens = side * side // 4  # merged 2x2
    pixel_shape = ((3, vision.patch_size, vision.patch_size) if config.model_type in ("kimi_k25", "kimi_vl")
                   else (vision.in_channels * vision.temporal_patch_size * vision.patch_size**2,))
    head = torch.tensor([config.vision_start_token_id] + [config.image_token_id] * image_tokens
                        + [config.vision_end_token_id])
    examples, family = [], family_of(model)
    for _ in range(seq // doc):
        ids = torch.cat([head, torch.randint(0, config.vision_start_token_id, (doc - len(head),))])
        labels = torch.where(torch.arange(doc) < len(head), IGNORE_INDEX, ids)
        pixels = torch.randn(side * side, *pixel_shape, dtype=model.dtype)
        examples.append(Encoded(ids, labels, pixels, grid,
                                family.positions(ids, grid), "bench"))
    return collate_pack(examples, family)


def make_batch(packed: dict[str, torch.Tensor], device: torch.device) -> Batch:
    targets, rows = target_rows(packed.pop("labels"))
    grid = packed.get("image_grid_thw")
    patches = int(grid.prod(-1).sum()) if grid is not None else 0
    return Batch({k: v.to(device) for k, v in packed.items()}, targets.to(device), rows.to(device),
                 patches)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def step_flops(model, batch: Batch, context: int) -> float:
    """Model FLOPs of one micro-batch (the module docstring's rule)."""
    core, lm = inner_model(model), language_model(model)
    seq, cfg = batch.targets.numel() + 1, lm.config
    embed = lm.embed_tokens.weight.numel()
    body = _count(lm) - embed - _inactive_experts(lm)
    flops = 6 * body * seq + 6 * model.lm_head.weight.numel() * batch.rows.numel()
    flops += 6 * cfg.num_hidden_layers * cfg.hidden_size * context * seq
    if batch.patches and model.config.model_type in ("kimi_k25", "kimi_vl"):
        projector = _count(core.mm_projector if hasattr(core, "mm_projector") else core.multi_modal_projector)
        flops += 6 * _count(core.vision_tower) * batch.patches + 6 * projector * batch.patches // 4
    elif batch.patches:
        merger = _count(core.visual.merger.mlp)
        merged = batch.patches // core.visual.spatial_merge_unit
        flops += 6 * (_count(core.visual) - merger) * batch.patches + 6 * merger * merged
    return flops


def _inactive_experts(lm) -> int:
    """Routed-expert parameters a token does not go through (0 without experts)."""
    cfg = lm.config
    experts = [m for name, m in lm.named_modules() if name.endswith("mlp.experts")]
    if not experts:
        return 0
    unused = 1 - cfg.num_experts_per_tok / cfg.n_routed_experts
    return int(sum(_count(m) for m in experts) * unused)


def full_loss(model, batch: Batch) -> torch.Tensor:
    logits = model(**batch.inputs, use_cache=False).logits[0, :-1]
    return F.cross_entropy(logits.float(), batch.targets, ignore_index=IGNORE_INDEX)


def _target_hidden(model, batch: Batch):
    """Final hidden states at target positions, the vocabulary projection, and the targets."""
    head = getattr(model, "module", model).lm_head.weight
    return loss_position_hidden(model, batch.inputs, batch.rows), head, batch.targets[batch.rows]


def _chunk_ce(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy((hidden @ weight.t()).float(), targets, reduction="sum")


def chunked_loss(model, batch: Batch) -> torch.Tensor:
    """Cross-entropy without the full (tokens x vocabulary) float logits: each chunk's logits
    are made, reduced and recomputed in backward (activation checkpointing)."""
    hidden, head, targets = _target_hidden(model, batch)
    total = sum(checkpoint(_chunk_ce, hidden[i:i + LOSS_CHUNK], head, targets[i:i + LOSS_CHUNK],
                           use_reentrant=False) for i in range(0, targets.numel(), LOSS_CHUNK))
    return total / targets.numel()


def fused_loss(model, batch: Batch) -> torch.Tensor:
    """The SFT trainer's loss (``kimivl_rl.sft.trainer.answer_loss_sum``), as a mean."""
    return causal_lm_loss_sum(model, batch.inputs, batch.targets, batch.rows) / batch.rows.numel()


LOSSES = {"plain": full_loss, "deepspeed": full_loss, "ds+chunked": chunked_loss,
          "ds+fused": fused_loss}


def full_logprobs(model, batch: Batch) -> torch.Tensor:
    """Target log-probabilities from float logits over the vocabulary at every position."""
    logits = model(**batch.inputs, use_cache=False).logits[0, :-1].float()
    logprobs = torch.log_softmax(logits[batch.rows], dim=-1)
    return logprobs.gather(1, batch.targets[batch.rows][:, None])[:, 0]


def chunked_logprobs(model, batch: Batch) -> torch.Tensor:
    """The learner's target log-probabilities (``kimivl_rl.system.learner.response_logprobs``)."""
    return causal_lm_target_logprobs(model, batch.inputs, batch.targets, batch.rows)


RL_LOGPROBS = {"rl+full": full_logprobs, "rl+chunked": chunked_logprobs}


def response_sizes(batch: Batch, doc: int) -> list[int]:
    """Targets per document (each document one response): a row predicts the next token."""
    counts = torch.bincount(torch.div(batch.rows + 1, doc, rounding_mode="floor"))
    return [n for n in counts.tolist() if n]


def rl_update(args, logprobs_fn, engine, batch: Batch):
    """One optimizer step of the RL learner: log π_old of each micro-batch, then the loss."""
    loss, sizes = get_loss(args.loss), response_sizes(batch, args.doc)
    advantages = torch.randn(len(sizes), device=engine.device)
    normalizer = loss.normalizer(len(sizes) * args.accum, sum(sizes) * args.accum)

    def responses(logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return pad_rows(list(logprobs.split(sizes)))

    def step():
        with torch.no_grad():
            old = [logprobs_fn(engine.module, batch) for _ in range(args.accum)]
        for old_logprobs in old:
            new, mask = responses(logprobs_fn(engine, batch))
            value, _ = loss.fn(new, responses(old_logprobs)[0], mask, advantages, normalizer, LossConfig())
            engine.backward(value)
            engine.step()
    return step


def make_step(args, variant: str, model, batch: Batch):
    """(one optimizer step, what frees its state afterwards)."""
    loss_fn, on_gpu = LOSSES.get(variant), model.device.type == "cuda"
    if variant == "plain":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=on_gpu)

        def step():
            for _ in range(args.accum):
                (loss_fn(model, batch) / args.accum).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step, lambda: None
    from kimivl_rl.training.engine import build_engine

    engine = build_engine(model, lambda s: 1e-5, zero_stage=args.zero, grad_accum_steps=args.accum,
                          bf16=on_gpu)
    if variant in RL_LOGPROBS:
        return rl_update(args, RL_LOGPROBS[variant], engine, batch), engine.destroy

    def step():
        for _ in range(args.accum):  # the engine steps the optimizer on the last one
            engine.backward(loss_fn(engine, batch))
            engine.step()
    return step, engine.destroy  # its gradient hooks would keep model and optimizer alive


def timed(step, steps: int, device: torch.device) -> float:
    for _ in range(3):
        step()
    sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - started) / steps


def measure(args, variant: str, vision: str | None, device: torch.device, dtype: torch.dtype,
            peak: float) -> tuple[float, float]:
    """Tokens per second and MFU of one variant (with one vision attention), printed; its model
    is freed on return."""
    model = build_model(args, device, dtype, vision)
    packed = (lm_batch(args.seq, args.doc, model.config.vocab_size) if args.shape == "lm"
              else vlm_batch(model, args.seq, args.doc, args.image))
    batch = make_batch(packed, device)
    if args.compile:
        compile_decoder_layers(model)
    step, close = make_step(args, variant, model, batch)
    try:
        seconds = timed(step, args.steps, device)
    finally:
        close()
    tokens_per_s = args.seq * args.accum / seconds
    scale = args.accum * (RL_FLOPS if variant in RL_LOGPROBS else 1)
    mfu = [100 * step_flops(model, batch, context) * scale / seconds / (peak * 1e12)
           for context in (args.seq, args.doc)]
    memory = (f"  peak mem {torch.cuda.max_memory_allocated() / 2**30:5.1f} GiB"
              if device.type == "cuda" else "")
    print(f"{label(variant, vision, padded=True)} {tokens_per_s:9.0f} tokens/s  MFU {mfu[0]:5.1f}% ({mfu[1]:4.1f}% "
          f"attention within documents){memory}", flush=True)
    return tokens_per_s, mfu[0]


def label(variant: str, vision: str | None, padded: bool = False) -> str:
    """A result's name (``padded``: to the width of the printed rows)."""
    name = f"{variant} {vision}" if vision else variant
    return name.ljust(17 if vision else 11) if padded else name


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def arg_parser() -> argparse.ArgumentParser:
    """The command line, also read by tests/test_bench_smoke.py for bench/README.md's commands."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=["lm", "vlm", *KIMI_SHAPES], default="lm")
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--doc", type=int, default=1024)
    parser.add_argument("--image", type=int, default=448, help="vlm: image side in pixels")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--attention", default="sdpa",
                        help="the language model's: sdpa or flex_attention")
    parser.add_argument("--variants", help=f"default {SFT_VARIANTS}; with --rl {RL_VARIANTS}")
    parser.add_argument("--rl", action="store_true", help="measure the RL update (module docstring)")
    parser.add_argument("--loss", default="kimi_pmd", help="--rl: the registered RL loss")
    parser.add_argument("--accum", type=int, default=1,
                        help="micro-batches (packed sequences) per optimizer step")
    parser.add_argument("--zero", type=int, default=2, help="ZeRO stage of the DeepSpeed variants")
    parser.add_argument("--compile", action="store_true", help="compile each decoder layer")
    parser.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU smoke check)")
    parser.add_argument("--vision-attention", default="loop,varlen",
                        help="vlm: loop and/or varlen, comma-separated (module docstring)")
    parser.add_argument("--experts", default="grouped_mm",
                        help="kimi, kimi_vl: eager and/or grouped_mm, comma-separated (module docstring)")
    return parser


def main() -> None:
    parser = arg_parser()
    args = parser.parse_args()
    # The second axis measured with every variant: vision attention (vlm) or experts (Kimi shapes).
    options = {"vlm": ("--vision-attention", args.vision_attention, VISION_ATTENTION),
               **{shape: ("--experts", args.experts, EXPERTS) for shape in KIMI_SHAPES}}.get(args.shape)
    visions = options[1].split(",") if options else [None]
    if options and (not visions or set(visions) - set(options[2])):
        parser.error(f"{options[0]}: comma-separated {' and/or '.join(options[2])}")
    if args.seq % args.doc:
        parser.error("--seq must be a multiple of --doc")
    if args.shape != "lm" and (args.image % 28 or (args.image // 28) ** 2 + 2 >= args.doc):
        parser.error("--image must be a multiple of 28 (14-pixel patches, merged 2x2) whose "
                     "tokens leave room for text in a document")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = matmul_peak_tflops(device, dtype)
    results = {}
    variants = (args.variants or (RL_VARIANTS if args.rl else SFT_VARIANTS)).split(",")
    for variant in variants:
        for vision in visions:
            try:
                results[label(variant, vision)] = measure(args, variant, vision, device, dtype, peak)
            except torch.OutOfMemoryError:
                print(f"{label(variant, vision, padded=True)} out of memory", flush=True)
            release(device)
    print(f"{str(dtype).removeprefix('torch.')} matmul peak {peak:.4g} TFLOP/s; {args.shape}; "
          f"seq {args.seq}, docs of {args.doc}, attention {args.attention}, {args.accum} "
          f"micro-batch(es) per optimizer step, ZeRO-{args.zero}, compile {args.compile}, "
          f"activation checkpointing {args.grad_ckpt}"
          + (f", {options[0].removeprefix('--')} {options[1]}" if options else ""))
    for vision in visions:
        print_ratios(results, label(variants[0], vision), [label(v, vision) for v in variants[1:]])
        if args.rl:
            print_ratios(results, label("rl+full", vision), [label("rl+chunked", vision)])
    for variant in variants:
        print_ratios(results, label(variant, visions[0]), [label(variant, v) for v in visions[1:]])


def print_ratios(results: dict[str, tuple[float, float]], base: str, others: list[str]) -> None:
    """Tokens/s ratio and MFU difference of each variant against ``base``, where both ran."""
    for variant in others:
        if base in results and variant in results:
            (tokens, mfu), (base_tokens, base_mfu) = results[variant], results[base]
            print(f"{variant} / {base}: {tokens / base_tokens:.2f}x tokens/s, MFU "
                  f"{mfu - base_mfu:+.1f} points")


if __name__ == "__main__":
    main()

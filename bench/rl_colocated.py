r"""RL at a real shape on one GPU, colocated: a Qwen2.5-VL-3B-shaped policy (random weights)
learning from 448-pixel image prompts, its rollout engine and its learner sharing the GPU
(cluster.colocate, weights through CUDA IPC, the engine asleep while the learner steps).

    python bench/rl_colocated.py --out DIR [--iterations 3] [--prepare | --report] [KEY=VALUE ...]
    python bench/rl_colocated.py --tiny --out DIR     # a CPU smoke run: the tiny model and sizes

--prepare builds the policy and the data and stops; --report prints the figures of DIR's run
(finished or not) without running.

The policy has Qwen2.5-VL-3B's sizes (bench/learner_gpu.py's vlm shape, all 36 layers) and the
tiny model's tokenizer and processor, the tokenizer padded with placeholder tokens to the
151,936-token vocabulary so that every id the policy samples decodes. A random policy never
ends a response: each runs to rollout.max_new_tokens and earns no reward, so
rl.drop_zero_advantage_groups=false sends every group to the learner. The prompts are the
built-in RL prompts, each with one image of data.image_size=448 pixels (256 merged image tokens).
Per iteration, 32 prompts x 8 samples of up to 1,024 tokens. Full Adam on 3.75B parameters takes
about 75 GB of GPU memory at the step (bf16 weights and gradients, fp32 master weights, gradients
and moments), which an 80 GB GPU cannot hold beside an engine, so the learner offloads the
optimizer to the CPU (rl.offload_optimizer, ZeRO-Offload), recomputes activations in backward
(rl.gradient_checkpointing) and frees Adam's moments after each iteration
(rl.reset_optimizer_each_iteration).

Prints per iteration: generated tokens/s; the learner's seconds, tokens/s and MFU (language-model
FLOPs, 6·N_body per trained token + 6·N_head per response token per optimizer step, over a bf16
matmul rate measured in the same run; the vision tower, attention and recomputation are not
counted, so it is a lower bound); sync seconds; learner and rollout idle seconds; and trained
tokens/s per GPU (each trained token once over the iteration's wall time, as verl and EasyR1
count throughput). DIR holds the policy, the data and the run (a rerun reuses the first two).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from kimivl_rl.config import load_config
from kimivl_rl.infra.layout import OutputLayout
from kimivl_rl.infra.metrics import read_jsonl
from kimivl_rl.models.loading import language_model
from kimivl_rl.models.tiny import TinyVLMSpec, build_tiny_vlm
from kimivl_rl.prepare import ensure_data, tiny_corpus, with_absolute_paths
from kimivl_rl.system.controller import run_rl

sys.path.insert(0, str(Path(__file__).parent))  # bench/ is no package: its learner_gpu.py beside this
from learner_gpu import matmul_peak_tflops, vlm_config  # noqa: E402

MARKER = "rl_colocated.json"  # what this bench built in DIR
BUILT = "built"  # the 3B policy was written to the end
TOKEN_IDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
PROCESSOR_FILES = ("processor_config.json", "tokenizer_config.json", "chat_template.jinja",
                   "generation_config.json")
SHAPE = {  # a 3B iteration: 256 responses of up to 1K tokens, 448-pixel images
    "gpu": ["cluster.use_gpu=true", "data.image_size=448", "rl.prompts_per_iteration=32",
            "rl.samples_per_prompt=8", "rollout.max_new_tokens=1024", "rl.micro_batch_tokens=16384",
            "rollout.gpu_memory_utilization=0.45"],
    "tiny": ["data.image_size=112", "rl.prompts_per_iteration=2", "rl.samples_per_prompt=2",
             "rollout.max_new_tokens=16", "rl.micro_batch_tokens=1024"],
}
DATA = ["data.joint_sft_examples=8", "data.long_cot_examples=8", "data.rl_prompts=256",
        "data.eval_examples=8", "data.arith_fraction=0.0"]
RUN = ["cluster.colocate=true", "cluster.weight_transport=ipc", "model.init_if_missing=false",
       "data.build_if_missing=true", "rl.drop_zero_advantage_groups=false",
       "rl.dynamic_sampling_rounds=0", "rl.gradient_checkpointing=true", "rl.offload_optimizer=true",
       "rl.reset_optimizer_each_iteration=true", "rl.eval_prompts=8", "rl.eval_every=1000",
       "rl.checkpoint_every=1000", "eval.samples=0"]


def claim(out: Path) -> None:
    """DIR is new, empty, or built by this bench: nothing of anyone else's is written over."""
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise SystemExit(f"{out} exists and was not made by bench/rl_colocated.py; name a new directory")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(json.dumps({"built_by": "bench/rl_colocated.py"}))


def pad_vocabulary(tokenizer_file: Path, size: int) -> None:
    """Give every unused id below ``size`` a placeholder token (never produced by encoding). The
    added tokens go into the vocabulary at their ids first: transformers renumbers an added
    token whose id lies inside the vocabulary's range but not in it."""
    spec = json.loads(tokenizer_file.read_text())
    vocab = spec["model"]["vocab"]
    vocab.update({token["content"]: token["id"] for token in spec["added_tokens"]})
    used = set(vocab.values())
    vocab.update({f"<x{i}>": i for i in range(size) if i not in used})
    tokenizer_file.write_text(json.dumps(spec, ensure_ascii=False))


def shaped_config(tiny_config: Qwen2_5_VLConfig) -> Qwen2_5_VLConfig:
    """Qwen2.5-VL-3B's sizes with the tiny model's special-token ids."""
    config = vlm_config(tiny=False)
    for key in TOKEN_IDS:
        setattr(config, key, getattr(tiny_config, key))
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(config.text_config, key, getattr(tiny_config.text_config, key))
    return config


def build_policy(out: Path, tiny: bool) -> Path:
    """The tiny model (--tiny), or the 3B-shaped policy around its tokenizer and processor."""
    base = out / "tiny_model"
    build_tiny_vlm(base, TinyVLMSpec(), tiny_corpus())
    policy = out / "policy_3b"
    if tiny or (policy / BUILT).is_file():
        return base if tiny else policy
    shutil.rmtree(policy, ignore_errors=True)  # an unfinished build of ours
    config = shaped_config(Qwen2_5_VLConfig.from_pretrained(base))
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16)
    model.save_pretrained(policy)
    for name in (*PROCESSOR_FILES, "tokenizer.json"):
        shutil.copy(base / name, policy / name)
    pad_vocabulary(policy / "tokenizer.json", config.text_config.vocab_size)
    (policy / BUILT).touch()
    return policy


def language_model_sizes(model_path: Path) -> tuple[int, int]:
    """(N_body, N_head): the language model's parameters less its embedding, and its
    vocabulary projection's (counted even where tied to the embedding: it is a matmul)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    body = sum(p.numel() for name, p in language_model(model).named_parameters()
               if "embed_tokens" not in name)
    text = config.text_config
    return body, text.vocab_size * text.hidden_size


def iteration_rows(cfg) -> list[dict]:
    return [row for row in read_jsonl(OutputLayout.of(cfg).metrics("rl")) if "time_learn_s" in row]


def figures(row: dict, cfg, body: int, head: int, peak_tflops: float) -> dict:
    """One iteration's throughput figures (module docstring)."""
    updates = cfg.rl.updates_per_iteration
    trained = row["learner_tokens"]
    responses = row["response_length_mean"] * row["learner_responses"]
    flops = updates * 6 * (body * trained + head * responses)
    learn = max(row["time_learn_s"], 1e-9)
    return {"gen_tokens_per_s": row["generated_tokens_per_s"],
            "time_generate_s": row["time_generate_s"], "time_learn_s": row["time_learn_s"],
            "learner_tokens_per_s": updates * trained / learn,
            "learner_mfu": flops / learn / (peak_tflops * 1e12),
            "time_sync_s": row["time_sync_s"], "learner_idle_s": row["learner_idle_s"],
            "rollout_idle_s": row["rollout_idle_s"], "time_iteration_s": row["time_iteration_s"],
            "trained_tokens_per_s_per_gpu": trained / row["time_iteration_s"],
            "responses": row["learner_responses"], "response_length_mean": row["response_length_mean"],
            "engine_sleep_freed_gib": row["engine_sleep_freed_gib"]}


def print_figures(rows: list[dict]) -> None:
    for step, f in enumerate(rows, start=1):
        print(f"iteration {step}: {f['responses']} responses of {f['response_length_mean']:.0f} tokens; "
              f"generate {f['time_generate_s']:.1f} s ({f['gen_tokens_per_s']:.0f} tokens/s); "
              f"learn {f['time_learn_s']:.1f} s ({f['learner_tokens_per_s']:.0f} tokens/s, "
              f"MFU {100 * f['learner_mfu']:.1f}%); sync {f['time_sync_s']:.2f} s; idle learner "
              f"{f['learner_idle_s']:.1f} s, rollout {f['rollout_idle_s']:.1f} s; iteration "
              f"{f['time_iteration_s']:.1f} s, {f['trained_tokens_per_s_per_gpu']:.0f} trained tokens/s/GPU; "
              f"engine sleep freed {f['engine_sleep_freed_gib']:.1f} GiB")
    later = rows[1:] or rows  # the first iteration also compiles and warms up
    mean = sum(f["trained_tokens_per_s_per_gpu"] for f in later) / len(later)
    print(f"trained tokens/s/GPU, mean of iterations {2 if rows[1:] else 1}+: {mean:.0f} "
          f"(EasyR1, Qwen2.5-VL-7B on H100: 1600-2000)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--tiny", action="store_true", help="the tiny model and sizes (a CPU smoke run)")
    step = parser.add_mutually_exclusive_group()
    step.add_argument("--prepare", action="store_true", help="build the policy and data, then stop")
    step.add_argument("--report", action="store_true", help="print DIR's figures without running")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args()
    out = args.out.resolve()
    claim(out)
    policy = build_policy(out, args.tiny)
    cfg = with_absolute_paths(load_config(args.config, [
        *SHAPE["tiny" if args.tiny else "gpu"], *DATA, *RUN, f"model.path={policy}",
        f"data.dir={out / 'data'}", f"output.dir={out / 'run'}", f"rl.iterations={args.iterations}",
        *args.overrides]))
    ensure_data(cfg)
    if args.prepare:
        return
    if not args.report:
        run_rl(cfg, str(policy))
    body, head = language_model_sizes(policy)
    device = torch.device("cuda" if cfg.cluster.use_gpu else "cpu")
    peak = matmul_peak_tflops(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    print(f"policy {policy}: N_body {body / 1e9:.3f}B, N_head {head / 1e9:.3f}B; matmul peak {peak:.4g} TFLOP/s")
    print_figures([figures(row, cfg, body, head, peak) for row in iteration_rows(cfg)])


if __name__ == "__main__":
    main()

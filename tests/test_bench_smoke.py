"""CPU smoke runs of the GPU benchmarks' tiny paths: every variant runs and its ratios print.

bench/weight_sync.py --transport ipc,host cannot run without CUDA (a ring of GPU buffers, or a host
ring pinned with cudaHostRegister, into a receiver whose parameters are on the GPU); its CPU part,
the Qwen2.5 weight tables and their bucket plans, is checked here, and the ring protocol it runs
is exercised on CPU between two processes by tests/test_weight_sync.py."""
from __future__ import annotations

import importlib.util
import itertools
import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def bench_module(name: str):
    """A bench/ script imported as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_process(*args: str) -> subprocess.CompletedProcess:
    """This Python on ``args`` in the repository, its output captured."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def run_bench(*args: str) -> str:
    done = run_process(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


# bench/learner_gpu.py in tiny sizes, with the flags of each command in bench/README.md beside
# (test_every_readme_learner_command_has_a_smoke_run checks that none is left out).
LEARNER_TINY = ("--tiny", "--seq", "256", "--doc", "128", "--image", "112", "--steps", "1")
LEARNER_RUNS = {
    "lm": "--accum 2",
    "lm-compile": "--accum 2 --compile --variants plain,ds+fused",
    "rl-compile": "--rl --accum 2 --compile",
    "vlm": "--shape vlm --accum 2 --variants plain,ds+fused --vision-attention loop,varlen",
    "vlm-compile": "--shape vlm --accum 2 --compile --variants ds+fused "
                   "--vision-attention loop,varlen",
    "vlm-grad-ckpt-compile": "--shape vlm --accum 2 --grad-ckpt --compile --variants ds+fused "
                             "--vision-attention loop",
    "kimi": "--shape kimi --accum 2 --variants ds+fused --experts eager,grouped_mm",
    "kimi-compile": "--shape kimi --accum 2 --compile --variants ds+fused --experts grouped_mm",
    "kimi-grad-ckpt": "--shape kimi --accum 2 --grad-ckpt --variants plain --experts grouped_mm",
    "kimi_vl-grad-ckpt": "--shape kimi_vl --accum 2 --grad-ckpt --variants plain,ds+fused "
                         "--experts eager,grouped_mm",
}
PINNED_ATTENTION = "flex_attention"  # no backward on CPU: test_learner_bench_flex_attention_on_cpu


def run_learner_bench(*args: str) -> subprocess.CompletedProcess:
    """bench/learner_gpu.py under torchrun, one process, in tiny sizes."""
    return run_process("-m", "torch.distributed.run", "--nproc_per_node", "1",
                       "bench/learner_gpu.py", *LEARNER_TINY, *args)


def learner_axes(bench, argv: list[str]) -> tuple[tuple, list[str], list, str]:
    """(shape and switches, variants, vision attentions or experts, attention) of a command."""
    args = bench.arg_parser().parse_args(argv)
    variants = (args.variants or (bench.RL_VARIANTS if args.rl else bench.SFT_VARIANTS)).split(",")
    options = {"vlm": args.vision_attention, **dict.fromkeys(bench.KIMI_SHAPES, args.experts)
               }.get(args.shape, "").split(",")
    switches = (args.shape, args.rl, args.compile, args.grad_ckpt, args.accum > 1)
    return switches, variants, [o or None for o in options], args.attention


def readme_learner_commands(readme: Path) -> list[list[str]]:
    """bench/learner_gpu.py's arguments in each command of ``readme`` (``$B`` expanded)."""
    prefix, commands = "", []
    for line in readme.read_text(encoding="utf-8").replace("\\\n", " ").splitlines():
        command = line.split(" # ")[0].strip()
        if 'B="' in command and "learner_gpu.py" in command:
            prefix = command.split("learner_gpu.py")[1].split('"')[0]
        elif command.startswith("$B "):
            commands.append(shlex.split(prefix + command[2:]))
        elif command.startswith(("torchrun ", "python ")) and "learner_gpu.py" in command:
            commands.append(shlex.split(command.split("learner_gpu.py")[1]))
    return commands


def test_every_readme_learner_command_has_a_smoke_run():
    """Each bench/learner_gpu.py command of README.md and bench/README.md has a run in
    LEARNER_RUNS of its shape and switches that measures what it does; FlexAttention is pinned."""
    bench = bench_module("learner_gpu")
    runs = [learner_axes(bench, flags.split()) for flags in LEARNER_RUNS.values()]
    commands = [c for readme in ("README.md", "bench/README.md")
                for c in readme_learner_commands(ROOT / readme)]
    assert len(commands) >= 9  # bench/README.md's, as of this test
    for command in commands:
        switches, variants, options, attention = learner_axes(bench, command)
        assert attention in ("sdpa", PINNED_ATTENTION), command
        assert any(s == switches and set(variants) <= set(v) and set(options) <= set(o)
                   for s, v, o, _ in runs), command


@pytest.mark.slow
@pytest.mark.parametrize("flags", LEARNER_RUNS.values(), ids=LEARNER_RUNS.keys())
def test_learner_bench_tiny(flags):
    """Every variant with every option measured; the ratios to the first variant and option."""
    bench = bench_module("learner_gpu")
    done = run_learner_bench(*flags.split())
    assert done.returncode == 0, done.stderr[-3000:]
    (_, rl, compiled, *_), variants, options, _ = learner_axes(bench, flags.split())
    lines = done.stdout.splitlines()
    for variant, option in itertools.product(variants, options):
        name = bench.label(variant, option) + " "
        assert any(line.startswith(name) and "tokens/s" in line for line in lines), name
    base = bench.label(variants[0], options[0])
    others = {bench.label(variants[-1], options[0]), bench.label(variants[0], options[-1])}
    for other in others - {base}:
        assert f"{other} / {base}:" in done.stdout
    assert ("rl+chunked / rl+full:" in done.stdout) == rl and f"compile {compiled}," in done.stdout


@pytest.mark.slow
def test_learner_bench_flex_attention_on_cpu():
    """bench/README.md's commands run FlexAttention, which torch cannot train on CPU; the smoke
    runs use sdpa. When this fails, torch can: run LEARNER_RUNS with FlexAttention instead."""
    done = run_learner_bench("--attention", PINNED_ATTENTION, "--variants", "plain")
    assert done.returncode != 0
    assert ("NotImplementedError: FlexAttention does not support backward on CPU."
            in done.stderr), done.stderr[-3000:]


@pytest.mark.parametrize("shape, option, vision_blocks", [("lm", None, 0), ("vlm", "varlen", 2)])
def test_compile_decoder_layers(shape, option, vision_blocks):
    """--compile (and sft.compile_layers): each decoder layer compiled on its own, and each fused
    vision block of a VLM; a plain causal LM, which no model family handles, too."""
    import torch
    from kimivl_rl.models.loading import compile_decoder_layers, language_model

    bench = bench_module("learner_gpu")
    args = bench.arg_parser().parse_args(["--tiny", "--shape", shape])
    model = bench.build_model(args, torch.device("cpu"), torch.float32, option)
    compile_decoder_layers(model)
    compiled = [m for m in model.modules() if m._compiled_call_impl is not None]
    assert len(compiled) == len(language_model(model).layers) + vision_blocks


@pytest.mark.parametrize("shape", ["kimi", "kimi_vl"])
def test_learner_bench_counts_only_the_experts_a_token_goes_through(shape):
    """MFU of the Kimi shapes: of each layer's routed experts, 2 of 4 (tiny) count."""
    import torch

    bench = bench_module("learner_gpu")
    args = bench.arg_parser().parse_args(["--tiny", "--shape", shape])
    lm = bench.language_model(bench.build_model(args, torch.device("cpu"), torch.float32, "grouped_mm"))
    experts = sum(p.numel() for name, p in lm.named_parameters() if ".mlp.experts." in name)
    assert experts > 0 and bench._inactive_experts(lm) == experts // 2


def test_weight_sync_bench_colocated_weight_tables():
    """The weights bench/weight_sync.py --transport ipc,host moves: parameter counts as in
    bench/README.md, every bucket within --bucket-mb 512 unless one tensor alone exceeds it."""
    bench = bench_module("weight_sync")
    from kimivl_rl.infra.weight_sync import bucket_bytes

    cap = 512 * 2**20
    for size, params in {"1.5b": 1_543_714_304, "3b": 3_085_938_688, "7b": 7_614_699_008}.items():
        specs = bench.qwen_weight_specs(size)
        assert sum(math.prod(shape) for _, _, shape in specs) == params, size
        plan = bench.plan_buckets(specs, cap)
        assert [slot.name for bucket in plan for slot in bucket] == [name for name, _, _ in specs]
        assert all(bucket_bytes(bucket) <= cap or len(bucket) == 1 for bucket in plan), size
        assert sum(math.prod(slot.shape) * 2 for bucket in plan for slot in bucket) == 2 * params


def _rl_metrics(tmp_path, rows: list[dict]):
    """A tiny config whose output.dir holds ``rows`` as its RL metrics, after an eval-only row."""
    from kimivl_rl.config import load_config
    from kimivl_rl.infra.layout import OutputLayout

    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"output.dir={tmp_path}"])
    path = OutputLayout.of(cfg).metrics("rl")
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in [{"step": 0, "eval_reward": 0.5}, *rows]))
    return cfg


@pytest.mark.slow
def test_learner_images_bench_tiny(tiny_model_dir, small_data_dir):
    out = run_bench("bench/learner_images.py", "--model", str(tiny_model_dir), "--prompts", "2",
                    "--samples", "2", "--repeats", "1", f"data.dir={small_data_dir}",
                    "data.build_if_missing=false")
    for variant in ("per response", "shared"):
        assert any(line.startswith(variant + " ") and "responses/s" in line for line in out.splitlines())
    assert "shared / per response:" in out and "2 image prompts x 2 responses" in out


def test_rl_async_overlap_bound_by_hand(tmp_path):
    """Collections 4, 2, 3 s, updates 3, 3, 1 s, syncs 0.5 s: in turn 17.5 s; overlapped, the
    first collection alone, then max(2, 3), max(3, 3), max(0, 1), each plus its sync: 12.5 s."""
    rows = [{"step": step, "time_generate_s": c - 0.25, "time_reward_s": 0.25, "time_learn_s": l,
             "time_sync_s": 0.5, "time_iteration_s": c + l + 0.5}
            for step, (c, l) in enumerate([(4.0, 3.0), (2.0, 3.0), (3.0, 1.0)], start=1)]
    cfg = _rl_metrics(tmp_path, rows)
    assert bench_module("rl_async").overlap_bound(cfg) == pytest.approx(12.5 / 17.5, rel=1e-12)


def test_rl_async_unit_costs_by_hand(tmp_path):
    """Two iterations: 3 rounds in 6 s generating 600 tokens (100/s), then 1 round in 2 s
    generating 400 (200/s): 2 s a round and 125 tokens/s; 48 responses learned in 4.8 s, 0.1 s
    each; 10 prompts of 8 samples in 16 s of iterations, 5 samples/s."""
    rows = [{"step": step, "time_iteration_s": 8.0, "time_generate_s": gen, "sampling_rounds": rounds,
             "generated_tokens_per_s": rate, "time_learn_s": learn, "learner_responses": responses,
             "sampled_prompts": list(range(prompts)), "learner_idle_s": 1.0, "rollout_idle_s": 2.0,
             "staleness_mean": 1.0, "partial_groups": 0, "repeat_fraction": 0.0}
            for step, (gen, rounds, rate, learn, responses, prompts)
            in enumerate([(6.0, 3, 100.0, 2.4, 24, 6), (2.0, 1, 200.0, 2.4, 24, 4)], start=1)]
    figures = bench_module("rl_async").iteration_figures(_rl_metrics(tmp_path, rows))
    assert figures["s_per_round"] == pytest.approx(2.0, rel=1e-12)
    assert figures["gen_tokens_per_s"] == pytest.approx(125.0, rel=1e-12)
    assert figures["s_per_response"] == pytest.approx(0.1, rel=1e-12)
    assert figures["samples_per_s"] == pytest.approx(5.0, rel=1e-12)
    assert figures["s_per_iter"] == figures["s_per_iter_2+"] == 8.0


@pytest.mark.slow
def test_rl_colocated_bench_tiny(tmp_path):
    """bench/rl_colocated.py's whole path on CPU (the tiny model, colocated over the shared-memory
    ring, optimizer offloaded, activations recomputed): one iteration, its figures printed; a
    second call reports them without running again (the same figures, but for the MFU, whose
    matmul rate each call measures anew)."""
    import re

    def figures(out: str) -> list[str]:
        return [re.sub(r"MFU [\d.]+%", "MFU", line) for line in out.splitlines()[-2:]]

    out = run_bench("bench/rl_colocated.py", "--tiny", "--out", str(tmp_path / "run"), "--iterations", "1")
    assert "iteration 1: 4 responses" in out and "trained tokens/s/GPU" in out
    assert figures(run_bench("bench/rl_colocated.py", "--tiny", "--out", str(tmp_path / "run"),
                             "--iterations", "1", "--report")) == figures(out)


def test_rl_colocated_figures_by_hand():
    """2 updates of 1,000 trained tokens (10 responses of 50) in 2 s of learning, a 4 s
    iteration, N_body 1e6, N_head 1e5, a 1 TFLOP/s peak: 2 x 6 x (1e6 x 1000 + 1e5 x 500) FLOPs
    = 1.26e10 in 2 s is 0.63% MFU; 1,000 learner tokens/s; 250 trained tokens/s per GPU."""
    from kimivl_rl.config import load_config

    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["rl.updates_per_iteration=2"])
    row = {"learner_tokens": 1000, "response_length_mean": 50.0, "learner_responses": 10,
           "time_learn_s": 2.0, "time_iteration_s": 4.0, "generated_tokens_per_s": 300.0,
           "time_generate_s": 1.5, "time_sync_s": 0.1, "learner_idle_s": 1.5, "rollout_idle_s": 2.1,
           "engine_sleep_freed_gib": 0.0}
    figures = bench_module("rl_colocated").figures(row, cfg, body=10**6, head=10**5, peak_tflops=1.0)
    assert figures["learner_mfu"] == pytest.approx(0.0063, rel=1e-12)
    assert figures["learner_tokens_per_s"] == pytest.approx(1000.0, rel=1e-12)
    assert figures["trained_tokens_per_s_per_gpu"] == pytest.approx(250.0, rel=1e-12)


def test_rl_colocated_pads_the_vocabulary_so_every_id_decodes(tmp_path, tiny_model_dir):
    """Every id below the size decodes (a placeholder where the tokenizer had none); text
    encodes to the ids it did before."""
    import shutil

    from transformers import AutoTokenizer

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, tmp_path / name)
    before = AutoTokenizer.from_pretrained(tmp_path)
    bench_module("rl_colocated").pad_vocabulary(tmp_path / "tokenizer.json", 2000)
    after = AutoTokenizer.from_pretrained(tmp_path)
    assert len(before) < 2000 == len(after)
    assert all(after.convert_ids_to_tokens(i) is not None for i in range(2000))
    text = "What is 3 + 4? <|image_pad|><think>7</think>"
    assert after.encode(text) == before.encode(text) and after.decode(after.encode(text)) == text

"""On a CUDA GPU (skipped elsewhere, so CI, which has none, never counts them as passes): the
rollout engine in bf16 against the learner in bf16, the CUDA IPC weight sync into the engine's
in-place reload, and RL with the learner and engine colocated on one GPU through Ray.

    pytest -m gpu -s tests/test_gpu.py      # on a GPU host; bench/README.md keeps the last output
"""
from __future__ import annotations

import json
import os
import shutil
import threading

import pytest
import torch

from kimivl_rl.config import ConfigError, load_config
from kimivl_rl.models.families import FAMILIES, family_of
from kimivl_rl.models.tiny import TinyVLMSpec, build_tiny_vlm
from kimivl_rl.prepare import tiny_corpus
from test_family_parity import NEW_TOKENS, ROWS, TINY, _learner_logprobs, samples_of_a_fresh_engine

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def gpu_config(model_dir, family, *overrides):
    return load_config(TINY, [f"model.path={model_dir}", f"model.family={family}",
                              "cluster.use_gpu=true", *overrides])


def token_gaps(engine_samples, reference) -> torch.Tensor:
    """|engine log p - reference log p| of every sampled token, in one flat tensor."""
    engine = [torch.tensor(s.logprobs) for group in engine_samples for s in group]
    assert [len(lp) for lp in engine] == [len(lp) for lp in reference]
    return torch.cat([(e - r.float().cpu()).abs() for e, r in zip(engine, reference)])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bf16_engine_and_learner_agree_as_closely_as_bf16_allows(family, tmp_path):
    """The tolerance is derived from the learner's own bf16 error: both sides compute in bf16
    from the same bf16 weights, so if the engine's rounding error is no larger than the
    learner's (measured against the learner in float32 on the same tokens), the triangle
    inequality bounds their gap by twice it: mean |engine - learner| <= 2 x mean |learner_bf16 -
    learner_fp32|, and per token 4 x the learner's largest error (kernels round differently per
    token). The model is peaked, so a flat model cannot pass by being uniform."""
    from kimivl_rl.models.loading import load_policy
    from kimivl_rl.rollout.vllm_engine import check_vllm_version

    try:
        check_vllm_version(FAMILIES[family])
    except ConfigError as exc:  # the family's refusal is what users see; nothing to compare
        pytest.skip(str(exc))
    model_dir = build_tiny_vlm(tmp_path / "model", TinyVLMSpec(family=family, peaked=True), tiny_corpus())
    cfg = gpu_config(model_dir, family)
    bf16, processor = load_policy(str(model_dir), cfg)
    fp32, _ = load_policy(str(model_dir), gpu_config(model_dir, family, "model.dtype=float32"))
    samples = samples_of_a_fresh_engine(cfg, model_dir, processor, n=4)
    learner = _learner_logprobs(bf16.cuda(), processor, samples)
    exact = _learner_logprobs(fp32.cuda(), processor, samples)
    gap = token_gaps(samples, learner)
    own = torch.cat([(a.float() - b.float()).abs().cpu() for a, b in zip(learner, exact)])
    sampled = torch.cat([torch.tensor(s.logprobs) for group in samples for s in group])
    print(f"\n{family}: {len(gap)} tokens, mean p {sampled.exp().mean():.3f}; engine-learner mean "
          f"{gap.mean():.5f} max {gap.max():.5f}; learner bf16-fp32 mean {own.mean():.5f} "
          f"max {own.max():.5f}")
    assert sampled.exp().mean() > 0.2
    assert gap.mean() <= 2 * own.mean() and gap.max() <= 4 * own.max()


def _scaled_copy(model_dir, out_dir, factor: float):
    """A copy of a model directory whose weights are all multiplied by ``factor``."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, out_dir)
    weights = out_dir / "model.safetensors"
    save_file({k: v * factor for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"})
    return out_dir


def test_cuda_ipc_sync_gives_the_engine_exactly_the_weights_it_would_load(tmp_path):
    """An engine started from model B holds B's parameters (sums per parameter) and greedy
    outputs; reloaded with A it differs; synced with B through the CUDA IPC ring from another
    process's GPU buffers (buckets small enough that both slots are reused), it is B's again,
    bit for bit."""
    from safetensors.torch import load_file

    from kimivl_rl.evaluation import generation_requests
    from kimivl_rl.infra.ipc_weight_sync import RingSender
    from kimivl_rl.rollout.vllm_engine import VLLMEngine, engine_options
    from transformers import AutoProcessor

    model_a = build_tiny_vlm(tmp_path / "a", TinyVLMSpec(peaked=True), tiny_corpus())
    model_b = _scaled_copy(model_a, tmp_path / "b", 1.05)
    cfg = gpu_config(model_b, "qwen2_5_vl")
    requests = generation_requests(ROWS, AutoProcessor.from_pretrained(model_b))
    engine = VLLMEngine(engine_options(cfg, str(model_b)))

    def state() -> tuple[list, list]:
        greedy = engine.generate(requests, n=1, temperature=0.0, max_new_tokens=NEW_TOKENS)
        return engine.parameter_sums(), [g[0].token_ids for g in greedy]

    try:
        sums_b, greedy_b = state()
        engine.load_weights(load_file(model_a / "model.safetensors"))
        assert state()[0] != sums_b
        weights_b = {k: v.to(torch.bfloat16).cuda() for k, v in load_file(model_b / "model.safetensors").items()}
        ring = RingSender(weights_b, bucket_cap=2**20, device="cuda", timeout_s=120)
        accept = threading.Thread(target=ring.accept)
        accept.start()
        engine.attach_weight_ring(*ring.invitation())
        accept.join()
        sent = {}
        sender = threading.Thread(target=lambda: sent.update(bytes=ring.send(weights_b)))
        sender.start()
        engine.receive_weights_through_ring()
        sender.join()
        assert len(ring.plan) > 2 and sent["bytes"] >= sum(t.nbytes for t in weights_b.values())
        sums, greedy = state()
        print(f"\nIPC sync: {len(ring.plan)} buckets, {sent['bytes']} bytes; greedy {greedy_b[0][:8]}...")
        assert sums == sums_b and greedy == greedy_b
        ring.close()
    finally:
        engine.shutdown()


def test_three_rl_iterations_colocated_on_one_gpu(tmp_path, tiny_model_dir, small_data_dir, ray_cluster):
    """The tiny config's RL loop through Ray with the learner and the engine on one GPU: the
    engine sleeps while the learner steps (its memory comes back), the weights go through the
    IPC ring, and each iteration's rollouts score as the learner's bf16 weights do (the mean
    gap stays within bf16's reach, 2^-5 nats, as in the parity test above)."""
    from kimivl_rl.infra.layout import OutputLayout
    from kimivl_rl.system.controller import run_rl
    from test_rl_ray import rl_cfg

    cfg = rl_cfg(tmp_path, tiny_model_dir, small_data_dir, "rl.iterations=3", "rl.checkpoint_every=3",
                 "rl.eval_every=3", "cluster.use_gpu=true", "cluster.colocate=true",
                 "cluster.weight_transport=ipc", "rl.kl_coef=0.1")  # its reference shares the GPU
    summary = run_rl(cfg, cfg.model.path)
    records = [json.loads(line) for line in OutputLayout.of(cfg).metrics("rl").read_text().splitlines()]
    trained = [r for r in records if "reward_mean" in r]
    for r in trained:
        print({k: r[k] for k in ("step", "engine_sleep_freed_gib", "time_generate_s", "time_learn_s",
                                 "time_sync_s", "rollout_logprob_diff_abs_mean", "kl_ref")})
    assert summary["iterations"] == 3 and [r["step"] for r in trained] == [1, 2, 3]
    assert all(r["engine_sleep_freed_gib"] > 0 for r in trained)
    assert all(r["rollout_logprob_diff_abs_mean"] <= 2**-5 for r in trained)
    # the bf16 reference scores iteration 1's samples as the bf16 policy it equals does
    assert trained[0]["kl_ref"] <= 2**-5 and all(r["kl_ref"] >= 0 for r in trained)
    assert (OutputLayout.of(cfg).model("rl") / "model.safetensors").is_file()

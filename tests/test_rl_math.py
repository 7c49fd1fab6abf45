"""RL maths against hand-computed values: length penalty, advantages, losses, prompt sampler."""
from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch

from kimivl_rl.rl.advantages import ADVANTAGE_ESTIMATORS, get_advantage, register_advantage
from kimivl_rl.rl.experience import Trajectory, informative_groups
from kimivl_rl.rl.length_penalty import (grouped_length_penalty, length_penalty,
                                         length_penalty_weight_at)
from kimivl_rl.rl.losses import LOSSES, LossConfig, get_loss, reference_kl, register_loss
from kimivl_rl.rl.sampler import PromptSampler
from kimivl_rl.rl.schedule import rl_lr

INF = float("inf")


# ----------------------------------------------------------------------------- length penalty

def test_length_penalty_mixed():
    # min 10, max 30, span 20: lambda = 0.5 - (len - 10) / 20 = [0.5, 0.0, -0.5]; correct keeps
    # lambda, the wrong one gets min(0, 0.0) = 0.0
    assert length_penalty([10, 20, 30], [True, False, True]) == [0.5, 0.0, -0.5]


def test_length_penalty_wrong_short_response_is_not_rewarded():
    # same lambdas [0.5, 0.0, -0.5]; wrong short: min(0, 0.5) = 0; wrong long: min(0, -0.5)
    assert length_penalty([10, 20, 30], [False, True, False]) == [0.0, 0.0, -0.5]


def test_length_penalty_equal_lengths_and_single_response():
    assert length_penalty([7, 7, 7], [True, False, True]) == [0.0, 0.0, 0.0]
    assert length_penalty([42], [True]) == [0.0]
    assert length_penalty([], []) == []


def test_length_penalty_all_wrong_and_all_right():
    # min 4, max 16, span 12: lambda = [0.5, 0.5 - 4/12, 0.5 - 8/12, -0.5] = [1/2, 1/6, -1/6, -1/2]
    assert length_penalty([4, 8, 12, 16], [True] * 4) == pytest.approx([0.5, 1 / 6, -1 / 6, -0.5])
    all_wrong = length_penalty([4, 8, 12, 16], [False] * 4)
    assert all_wrong == pytest.approx([0.0, 0.0, -1 / 6, -0.5])
    assert all(v <= 0 for v in all_wrong)


def test_grouped_length_penalty_interleaved():
    # group a (positions 0, 2, 4): lengths [10, 30, 20], correct [T, F, T], span 20
    #   lambda [0.5, -0.5, 0.0] -> [0.5, -0.5, 0.0]
    # group b (positions 1, 3, 5): lengths [100, 200, 300], correct [F, T, T], span 200
    #   lambda [0.5, 0.0, -0.5] -> [min(0, 0.5) = 0.0, 0.0, -0.5]
    out = grouped_length_penalty([10, 100, 30, 200, 20, 300],
                                 [True, False, False, True, True, True],
                                 ["a", "b", "a", "b", "a", "b"])
    assert out == [0.5, 0.0, -0.5, 0.0, 0.0, -0.5]
    with pytest.raises(ValueError, match="same size"):
        grouped_length_penalty([1, 2], [True], ["a", "a"])


def test_length_penalty_in_groups_whose_answers_differ_only():
    # a: all right, lengths [10, 30] -> lambda [0.5, -0.5] under "all", 0 under mixed_only
    # b: all wrong, lengths [10, 30] -> [min(0, 0.5), min(0, -0.5)] = [0.0, -0.5], 0 under mixed_only
    # c: right 10, wrong 30 -> [0.5, -0.5] either way
    lengths, correct = [10, 30, 10, 30, 10, 30], [True, True, False, False, True, False]
    groups = ["a", "a", "b", "b", "c", "c"]
    assert grouped_length_penalty(lengths, correct, groups) == [0.5, -0.5, 0.0, -0.5, 0.5, -0.5]
    assert grouped_length_penalty(lengths, correct, groups, mixed_only=True) == \
        [0.0, 0.0, 0.0, 0.0, 0.5, -0.5]


def test_mixed_length_penalty_leaves_an_all_right_group_out_of_training():
    """Weight 0.5: under "all" the all-right group's rewards differ (1.25 vs 0.75) and it trains;
    under "mixed" they are equal (1.0) and only the group whose answers differ is kept."""
    from kimivl_rl.rl.experience import add_length_penalty

    def group(prompt: int, scores: list[float]) -> list[Trajectory]:
        return [Trajectory(prompt, [1], [2] * n, [0.0] * n, "stop", task_reward=s)
                for n, s in zip((10, 30), scores)]

    batch = group(1, [1.0, 1.0]) + group(2, [1.0, 0.0])
    add_length_penalty(batch, 0.5)
    assert [t.reward for t in batch] == [1.25, 0.75, 1.25, -0.25]
    assert informative_groups(batch) == batch
    add_length_penalty(batch, 0.5, mixed_only=True)
    assert [t.reward for t in batch] == [1.0, 1.0, 1.25, -0.25]
    assert informative_groups(batch) == batch[2:]


def test_length_penalty_warm_up_weight():
    assert length_penalty_weight_at(0, 0.5, 10) == 0.0
    assert length_penalty_weight_at(9, 0.5, 10) == 0.0
    assert length_penalty_weight_at(10, 0.5, 10) == 0.5
    assert length_penalty_weight_at(11, 0.5, 10) == 0.5
    assert length_penalty_weight_at(0, 0.5, 0) == 0.5


def test_rl_learning_rate_warms_up_linearly_then_holds():
    # 4 warm-up steps to 1e-5: 0.25, 0.5, 0.75, 1.0 of it at steps 0-3, then the rate itself
    assert [rl_lr(1e-5, 4, step) for step in range(6)] == pytest.approx(
        [2.5e-6, 5e-6, 7.5e-6, 1e-5, 1e-5, 1e-5], rel=1e-12)
    assert [rl_lr(1e-5, 0, step) for step in range(3)] == [1e-5, 1e-5, 1e-5]


# ----------------------------------------------------------------------------- advantages

# group 7 at positions 0, 2, 4 with rewards [1, 0, 0]; group 3 at 1, 3 with [1, 0];
# group 1 at 5, 6 with [1, 1] (all equal)
REWARDS = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0], dtype=torch.float64)
GROUPS = torch.tensor([7, 3, 7, 3, 7, 1, 1])


def test_group_mean_advantages():
    # means: group 7 -> 1/3, group 3 -> 1/2, group 1 -> 1
    expected = torch.tensor([2 / 3, 0.5, -1 / 3, -0.5, -1 / 3, 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(get_advantage("group_mean")(REWARDS, GROUPS), expected)


def test_group_norm_advantages_population_std():
    # group 7: centred [2/3, -1/3, -1/3], population var (4/9 + 1/9 + 1/9) / 3 = 2/9,
    #          std sqrt(2)/3 -> (2/3) / (sqrt(2)/3 + eps) ~ sqrt(2), (-1/3) / (...) ~ -1/sqrt(2)
    # group 3: centred [0.5, -0.5], std 0.5 -> +-0.5 / (0.5 + eps) ~ +-1
    # group 1: centred [0, 0], std 0 -> 0 / (0 + eps) = 0 (no NaN)
    eps, s7 = 1e-6, math.sqrt(2) / 3
    expected = torch.tensor([(2 / 3) / (s7 + eps), 0.5 / (0.5 + eps), (-1 / 3) / (s7 + eps),
                             -0.5 / (0.5 + eps), (-1 / 3) / (s7 + eps), 0.0, 0.0],
                            dtype=torch.float64)
    out = ADVANTAGE_ESTIMATORS["group_norm"](REWARDS, GROUPS)
    torch.testing.assert_close(out, expected)
    assert not torch.isnan(out).any()


def test_group_norm_single_response_group_and_int_rewards():
    out = get_advantage("group_norm")(torch.tensor([1, 0, 1]), torch.tensor([0, 1, 1]))
    # group 0 alone -> 0; group 1 [0, 1] -> mean 0.5, std 0.5 -> -+0.5 / (0.5 + 1e-6)
    torch.testing.assert_close(out, torch.tensor([0.0, -0.5 / (0.5 + 1e-6), 0.5 / (0.5 + 1e-6)]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("value", [0.7, 2.7, 1 / 3, -0.1])
def test_equal_rewards_give_exactly_zero_advantage_in_any_dtype(dtype, value):
    # float32: mean of eight 0.7s is 0.7 + 6e-8; divided by a std of the same size that was
    # +-0.056 per response before constant groups were detected by their min and max
    rewards = torch.full((8,), value, dtype=dtype)
    mixed = torch.cat([rewards, torch.tensor([0.0, 1.0], dtype=dtype)])
    groups = torch.tensor([0] * 8 + [1, 1])
    for name in ADVANTAGE_ESTIMATORS:
        assert (get_advantage(name)(rewards, torch.zeros(8, dtype=torch.long)) == 0).all(), name
        assert (get_advantage(name)(mixed, groups)[:8] == 0).all(), name


def test_group_norm_sample_std_is_the_peers_normalisation():
    # group [1, 0, 0]: centred [2/3, -1/3, -1/3], sample var (4/9 + 1/9 + 1/9) / 2 = 1/3
    # group [1, 0]: centred [0.5, -0.5], sample var 0.5 -> std sqrt(0.5)
    # group [1] alone: 0
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    groups = torch.tensor([4, 4, 4, 2, 2, 9])
    s3, s2, eps = math.sqrt(1 / 3), math.sqrt(0.5), 1e-6
    expected = torch.tensor([(2 / 3) / (s3 + eps), (-1 / 3) / (s3 + eps), (-1 / 3) / (s3 + eps),
                             0.5 / (s2 + eps), -0.5 / (s2 + eps), 0.0], dtype=torch.float64)
    torch.testing.assert_close(get_advantage("group_norm_sample_std")(rewards, groups), expected)
    # against torch's own unbiased std, group by group
    for g in (4, 2):
        r = rewards[groups == g]
        torch.testing.assert_close(get_advantage("group_norm_sample_std")(r, torch.zeros_like(r).long()),
                                   (r - r.mean()) / (r.std(unbiased=True) + eps))


def test_format_penalty_joins_the_task_reward_and_the_length_penalty():
    """Group of three to one prompt, lengths 10/20/30, all correct; the 20-token one did not think.
    Length penalty by hand: lambda = 0.5 - (len - 10) / 20 = 0.5, 0, -0.5; weight 0.5."""
    from kimivl_rl.reward.contract import RewardOutput
    from kimivl_rl.rl.experience import add_length_penalty, assign_rewards

    batch = [Trajectory(4, [1], [2] * n, [0.0] * n, "stop") for n in (10, 20, 30)]
    assign_rewards(batch, [RewardOutput(1.0)] * 3, 0.0, [True, False, True], format_penalty=0.25)
    assert [t.reward for t in batch] == [1.0, 0.75, 1.0]  # warm-up: no length term yet
    assert [t.format_penalty for t in batch] == [0.0, -0.25, 0.0]
    add_length_penalty(batch, 0.5)  # the iteration's weight, applied later by the controller
    assert [t.reward for t in batch] == [1.25, 0.75, 0.75]
    assert informative_groups(batch) == batch  # equal task rewards, unequal formats: a gradient
    assign_rewards(batch, [RewardOutput(1.0)] * 3, 0.0)  # no thinking list: no format term
    assert [t.format_penalty for t in batch] == [0.0, 0.0, 0.0]


def test_informative_groups_keep_only_groups_with_unequal_rewards():
    def trajectory(prompt: int, reward: float) -> Trajectory:
        return Trajectory(prompt, [1], [2], [0.0], "stop", reward=reward)

    batch = [trajectory(7, 1.0), trajectory(3, 0.0), trajectory(7, 1.0), trajectory(3, 1.0),
             trajectory(5, 0.0), trajectory(5, 0.0), trajectory(9, 0.75), trajectory(9, 0.5)]
    kept = informative_groups(batch)
    # 7: all right, 5: all wrong -> dropped; 3 mixed, 9 equal task rewards but unequal length
    # penalties -> kept, in their order
    assert [(t.prompt_index, t.reward) for t in kept] == [(3, 0.0), (3, 1.0), (9, 0.75), (9, 0.5)]
    # what is dropped is exactly what has zero advantage under both estimators
    rewards = torch.tensor([t.reward for t in batch])
    groups = torch.tensor([t.prompt_index for t in batch])
    for name in ("group_mean", "group_norm"):
        zero = get_advantage(name)(rewards, groups) == 0
        assert [t for t, z in zip(batch, zero.tolist()) if not z] == kept
    assert informative_groups([trajectory(1, 1.0)]) == []


# ----------------------------------------------------------------------------- losses

def pmd_example():
    # response 0: prompt token (mask 0) then 3 response tokens
    #   seq_new = -0.5 - 1.0 - 0.25 = -1.75, seq_old = -0.5 - 1.25 - 0.5 = -2.25, diff 0.5
    # response 1: 2 response tokens then padding (-inf, which must not leak)
    #   seq_new = -2.0 - 1.5 = -3.5, seq_old = -1.0 - 1.5 = -2.5, diff -1.0
    logprobs = torch.tensor([[-9.0, -0.5, -1.0, -0.25], [-2.0, -1.5, -INF, -INF]],
                            dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-9.0, -0.5, -1.25, -0.5], [-1.0, -1.5, -INF, -INF]], dtype=torch.float64)
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.float64)
    adv = torch.tensor([0.5, -0.5], dtype=torch.float64)
    return logprobs, old, mask, adv


def test_kimi_pmd_value_and_analytic_gradient():
    logprobs, old, mask, adv = pmd_example()
    loss, metrics = get_loss("kimi_pmd").fn(logprobs, old, mask, adv, 2.0, LossConfig(tau=0.1))
    # loss_0 = -(0.5)(-1.75) + 0.1/2 * 0.5^2 = 0.875 + 0.0125 = 0.8875
    # loss_1 = -(-0.5)(-3.5) + 0.1/2 * (-1.0)^2 = -1.75 + 0.05 = -1.70
    # (0.8875 - 1.70) / 2 = -0.40625
    assert loss.item() == pytest.approx(-0.40625, abs=1e-12)
    assert metrics["loss"] == pytest.approx(-0.40625, abs=1e-12)
    assert metrics["logprob_diff_abs_mean"] == pytest.approx((0.5 + 1.0) / 2)
    loss.backward()
    # d/dlogp = (-A_j + tau * diff_j) / 2: response 0 (-0.5 + 0.05) / 2 = -0.225,
    # response 1 (0.5 - 0.1) / 2 = 0.2; masked tokens 0
    expected = torch.tensor([[0.0, -0.225, -0.225, -0.225], [0.2, 0.2, 0.0, 0.0]],
                            dtype=torch.float64)
    torch.testing.assert_close(logprobs.grad, expected)


def test_grpo_value_with_clipped_tokens_and_token_normalisation():
    log = math.log
    old = torch.full((2, 3), -1.0, dtype=torch.float64)
    # log-ratios: response 0 [0, ln 1.5, masked], response 1 [ln 0.5, ln 1.1, ln 1.5]
    logprobs = (old + torch.tensor([[0.0, log(1.5), -INF], [log(0.5), log(1.1), log(1.5)]],
                                   dtype=torch.float64)).requires_grad_(True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    adv = torch.tensor([1.0, -0.5], dtype=torch.float64)
    loss, metrics = get_loss("grpo").fn(logprobs, old, mask, adv, 5.0, LossConfig(clip_eps=0.2))
    # A = 1:    ratio 1.0 -> -min(1.0, 1.0) = -1.0
    #           ratio 1.5 -> -min(1.5, 1.2) = -1.2   (clipped: ratio > 1.2, A > 0)
    # A = -0.5: ratio 0.5 -> -min(-0.25, 0.8 * -0.5 = -0.4) = 0.4   (clipped: ratio < 0.8, A < 0)
    #           ratio 1.1 -> -min(-0.55, -0.55) = 0.55
    #           ratio 1.5 -> -min(-0.75, 1.2 * -0.5 = -0.6) = 0.75  (not clipped)
    # sum = -1.0 - 1.2 + 0.4 + 0.55 + 0.75 = -0.5 over 5 tokens -> -0.1
    assert loss.item() == pytest.approx(-0.1, abs=1e-12)
    assert metrics["clip_fraction"] == pytest.approx(2 / 5)
    # sequence log-ratios: ln 1.5 and ln(0.5 * 1.1 * 1.5) = ln 0.825
    assert metrics["logprob_diff_abs_mean"] == pytest.approx((log(1.5) + abs(log(0.825))) / 2)
    loss.backward()
    # unclipped tokens: d(-ratio * A)/dlogp = -ratio * A, / 5; clipped and masked: 0
    expected = torch.tensor([[-1.0 / 5, 0.0, 0.0], [0.0, 0.55 / 5, 0.75 / 5]], dtype=torch.float64)
    torch.testing.assert_close(logprobs.grad, expected)


def test_grpo_dual_clip_bounds_negative_advantage_tokens():
    log = math.log
    old = torch.full((2, 3), -1.0, dtype=torch.float64)
    logprobs = (old + torch.tensor([[log(4.0), 0.0, -INF], [log(0.5), log(2.0), log(4.0)]],
                                   dtype=torch.float64)).requires_grad_(True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    adv = torch.tensor([1.0, -0.5], dtype=torch.float64)
    loss, metrics = get_loss("grpo").fn(logprobs, old, mask, adv, 5.0,
                                        LossConfig(clip_eps=0.2, dual_clip=3.0))
    # A = 1:    ratio 4.0 -> -min(4.0, 1.2) = -1.2   (clipped; the dual clip leaves A > 0 alone)
    #           ratio 1.0 -> -1.0
    # A = -0.5: ratio 0.5 -> min(max(0.25, 0.4), 1.5) = 0.4   (clipped: ratio < 0.8)
    #           ratio 2.0 -> min(max(1.0, 0.6), 1.5) = 1.0   (not clipped)
    #           ratio 4.0 -> min(max(2.0, 0.6), 1.5) = 1.5   (dual-clipped: ratio > 3)
    # sum = -1.2 - 1.0 + 0.4 + 1.0 + 1.5 = 0.7 over 5 tokens -> 0.14
    assert loss.item() == pytest.approx(0.14, abs=1e-12)
    assert metrics["clip_fraction"] == pytest.approx(3 / 5)
    loss.backward()
    expected = torch.tensor([[0.0, -1.0 / 5, 0.0], [0.0, 1.0 / 5, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(logprobs.grad, expected)
    off, _ = get_loss("grpo").fn(logprobs, old, mask, adv, 5.0, LossConfig(clip_eps=0.2))
    assert off.item() == pytest.approx((0.7 - 1.5 + 2.0) / 5, abs=1e-12)  # the 4.0 token: 2.0


def test_grpo_truncated_importance_weight_scales_each_token():
    log = math.log
    old = torch.full((2, 2), -1.0, dtype=torch.float64)
    logprobs = old.clone().requires_grad_(True)  # ratio 1 everywhere: the PPO term is -A
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    # pi_old / pi_rollout per token: 0.5, 4.0 (capped at 2.0), 1.5; the padding's value is ignored
    rollout = old - torch.tensor([[log(0.5), log(4.0)], [log(1.5), INF]], dtype=torch.float64)
    loss, metrics = get_loss("grpo").fn(logprobs, old, mask, adv, 3.0, LossConfig(is_cap=2.0),
                                        rollout_logprobs=rollout)
    # tokens: -1 * 0.5, -1 * 2.0, +2 * 1.5 -> sum 0.5 over 3 tokens
    assert loss.item() == pytest.approx(0.5 / 3, abs=1e-12)
    assert metrics["is_weight_mean"] == pytest.approx((0.5 + 2.0 + 1.5) / 3)
    loss.backward()
    # d(-ratio * A * w)/dlogp = -A * w * ratio (the weight is a constant), / 3
    expected = torch.tensor([[-0.5 / 3, -2.0 / 3], [3.0 / 3, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(logprobs.grad, expected)
    off, metrics = get_loss("grpo").fn(logprobs, old, mask, adv, 3.0, LossConfig(),
                                       rollout_logprobs=rollout)
    assert off.item() == pytest.approx((-1.0 - 1.0 + 2.0) / 3, abs=1e-12)
    assert metrics["is_weight_mean"] == 1.0


def test_kimi_pmd_truncated_importance_weight_is_a_sequence_ratio():
    log = math.log
    old = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]], dtype=torch.float64)
    logprobs = old.clone().requires_grad_(True)  # log pi = log pi_old: the tau term is 0
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    # sequence ratios pi_old / pi_rollout: 0.8 * 0.5 = 0.4, and 3.0 capped at 2.0
    rollout = old - torch.tensor([[log(0.8), log(0.5)], [log(3.0), 0.0]], dtype=torch.float64)
    loss, metrics = get_loss("kimi_pmd").fn(logprobs, old, mask, adv, 2.0,
                                            LossConfig(tau=0.1, is_cap=2.0), rollout_logprobs=rollout)
    # -A * seq_logp * w: -1 * -3.0 * 0.4 = 1.2 and +1 * -0.5 * 2.0 = -1.0; sum 0.2 over 2 responses
    assert loss.item() == pytest.approx(0.1, abs=1e-12)
    assert metrics["is_weight_mean"] == pytest.approx(1.2)
    loss.backward()
    expected = torch.tensor([[-0.4 / 2, -0.4 / 2], [2.0 / 2, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(logprobs.grad, expected)


def test_reference_kl_is_k3_with_its_gradient():
    log = math.log
    ref = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]], dtype=torch.float64)
    # pi / ref per token: 2, 0.5, (policy's 1.0 = ref's); the padding's values are ignored
    logprobs = (ref + torch.tensor([[log(2.0), log(0.5), 0.0], [0.0, INF, -INF]],
                                   dtype=torch.float64)).requires_grad_(True)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    kl = reference_kl(logprobs, ref, mask)
    # k3 = ref/pi - log(ref/pi) - 1: 0.5 + log 2 - 1, 2 - log 2 - 1, 0; 0 on a matching token
    expected = torch.tensor([[0.5 + log(2.0) - 1.0, 1.0 - log(2.0), 0.0], [0.0, 0.0, 0.0]],
                            dtype=torch.float64)
    torch.testing.assert_close(kl, expected, rtol=0, atol=1e-15)
    kl.sum().backward()
    # d k3 / d log pi = 1 - ref/pi: 0.5, -1, 0; no gradient reaches the padding
    grad = torch.tensor([[0.5, -1.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(logprobs.grad, grad, rtol=0, atol=1e-15)


@pytest.mark.parametrize("name", ["kimi_pmd", "grpo"])
def test_micro_batches_with_global_normalizer_sum_to_full_batch(name):
    gen = torch.Generator().manual_seed(0)
    logprobs = -torch.rand(6, 5, generator=gen, dtype=torch.float64)
    old = logprobs + 0.3 * (torch.rand(6, 5, generator=gen, dtype=torch.float64) - 0.5)
    mask = torch.rand(6, 5, generator=gen) > 0.3
    mask[:, 0] = True
    adv = torch.randn(6, generator=gen, dtype=torch.float64)
    spec, cfg = get_loss(name), LossConfig()
    norm = spec.normalizer(num_responses=6, num_tokens=int(mask.sum()))

    full_lp = logprobs.clone().requires_grad_(True)
    full, _ = spec.fn(full_lp, old, mask, adv, norm, cfg)
    full.backward()

    split_lp = logprobs.clone().requires_grad_(True)
    total = sum(spec.fn(split_lp[rows], old[rows], mask[rows], adv[rows], norm, cfg)[0]
                for rows in (slice(0, 2), slice(2, 6)))
    total.backward()
    torch.testing.assert_close(total, full)
    torch.testing.assert_close(split_lp.grad, full_lp.grad)


def test_loss_registry():
    assert (LOSSES["kimi_pmd"].advantage, LOSSES["kimi_pmd"].normalize_by) == ("group_mean",
                                                                               "responses")
    assert (LOSSES["grpo"].advantage, LOSSES["grpo"].normalize_by) == ("group_norm", "tokens")
    assert get_loss("kimi_pmd").normalizer(num_responses=4, num_tokens=37) == 4.0
    assert get_loss("grpo").normalizer(num_responses=4, num_tokens=37) == 37.0
    with pytest.raises(KeyError, match="unknown loss 'ppo'; registered: grpo, kimi_pmd"):
        get_loss("ppo")
    with pytest.raises(ValueError, match="unknown advantage estimator 'nope'"):
        register_loss("x", advantage="nope")
    with pytest.raises(ValueError, match="normalize_by"):
        register_loss("x", normalize_by="sequences")
    with pytest.raises(ValueError, match="already registered"):
        register_loss("grpo")(lambda *a: None)
    with pytest.raises(ValueError, match="already registered"):
        register_advantage("group_mean")(lambda r, g: r)
    with pytest.raises(KeyError, match="registered: group_mean, group_norm"):
        get_advantage("nope")
    assert "x" not in LOSSES


def test_loss_rejects_bad_shapes_and_normalizer():
    logprobs, old, mask, adv = pmd_example()
    fn, cfg = get_loss("kimi_pmd").fn, LossConfig()
    with pytest.raises(ValueError, match="equal"):
        fn(logprobs, old[:, :3], mask, adv, 2.0, cfg)
    with pytest.raises(ValueError, match="advantages"):
        fn(logprobs, old, mask, adv[:1], 2.0, cfg)
    with pytest.raises(ValueError, match="normalizer"):
        fn(logprobs, old, mask, adv, 0.0, cfg)


# ----------------------------------------------------------------------------- sampler

def test_uniform_probabilities_and_no_retirement():
    s = PromptSampler(4, "uniform", seed=0, drop_always_solved_after=1)
    np.testing.assert_allclose(s.probabilities(0), [0.25] * 4)
    s.update([0], [1.0], [True])
    np.testing.assert_allclose(s.probabilities(0), [0.25] * 4)


def test_prioritized_probabilities_after_ema_update():
    s = PromptSampler(4, "prioritized", seed=0, pass_rates=[0.2, None, 0.9, 1.0], floor=0.05,
                      ema_decay=0.7)
    s.update([0, 1], [1.0, 0.0], [True, False])
    # s0 = 0.7 * 0.2 + 0.3 * 1.0 = 0.44; s1 = 0.7 * 0.5 (unlabelled) + 0.3 * 0.0 = 0.35
    # s = [0.44, 0.35, 0.9, 1.0] -> max(1 - s, 0.05) = [0.56, 0.65, 0.10, 0.05], sum 1.36
    np.testing.assert_allclose(s.success, [0.44, 0.35, 0.9, 1.0])
    probs = s.probabilities(0)
    np.testing.assert_allclose(probs, np.array([0.56, 0.65, 0.10, 0.05]) / 1.36)
    # prompt 3 is solved (s = 1) but not retired: the floor keeps it drawable
    assert probs[3] == pytest.approx(0.05 / 1.36) and probs[3] > 0


def test_informative_probabilities_favour_prompts_sometimes_solved():
    s = PromptSampler(4, "informative", seed=0, pass_rates=[0.5, 0.0, 1.0, 0.2], floor=0.05)
    # s (1 - s) + floor = [0.25 + 0.05, 0.05, 0.05, 0.16 + 0.05] = [0.30, 0.05, 0.05, 0.21]
    np.testing.assert_allclose(s.probabilities(0), np.array([0.30, 0.05, 0.05, 0.21]) / 0.61)
    s.update([0], [1.0], [True])  # s0 = 0.7 * 0.5 + 0.3 = 0.65 -> 0.2275 + 0.05; never retired
    np.testing.assert_allclose(s.probabilities(0), np.array([0.2775, 0.05, 0.05, 0.21]) / 0.5875)
    for _ in range(5):
        s.update([2], [1.0], [True])
    assert s.active.all()


def test_unobserved_prompts_borrow_their_stratums_running_success():
    s = PromptSampler(5, "informative", seed=0, pass_rates=[None, None, None, None, 0.9],
                      strata=[1, 1, 2, None, 1], floor=0.0)
    s.update([0], [1.0], [True])
    # stratum 1: 0.7 * 0.5 + 0.3 * 1.0 = 0.65; prompt 0: from 0.5 to 0.65 as well; prompt 1
    # borrows stratum 1's rate; stratum 2 and none: 0.5; a labelled prompt keeps its label
    np.testing.assert_allclose(s.estimates(), [0.65, 0.65, 0.5, 0.5, 0.9])
    s.update([1], [0.0], [False])
    # stratum 1: 0.7 * 0.65 = 0.455; prompt 1 starts from the borrowed 0.65 -> 0.455
    np.testing.assert_allclose(s.estimates(), [0.65, 0.455, 0.5, 0.5, 0.9])
    restored = PromptSampler(5, "informative", seed=0, pass_rates=[None, None, None, None, 0.9],
                             strata=[1, 1, 2, None, 1], floor=0.0)
    restored.load_state_dict(json.loads(json.dumps(s.state_dict())))
    np.testing.assert_allclose(restored.estimates(), s.estimates())
    assert restored.sample(3, 4) == s.sample(3, 4)


def test_retirement_after_consecutive_all_correct_iterations():
    s = PromptSampler(3, "prioritized", seed=0, drop_always_solved_after=3)
    s.update([0], [1.0], [True])
    s.update([0], [1.0], [True])
    s.update([0], [0.5], [False])       # streak reset: 2 -> 0
    s.update([0], [1.0], [True])
    s.update([0], [1.0], [True])
    assert s.active.tolist() == [True, True, True] and s.probabilities(0)[0] > 0
    s.update([0], [1.0], [True])        # third in a row: retired
    assert s.active.tolist() == [False, True, True]
    assert s.probabilities(0)[0] == 0.0
    assert all(sorted(s.sample(i, 2)) == [1, 2] for i in range(5))


def test_all_retired_falls_back_to_every_prompt():
    s = PromptSampler(1, "prioritized", seed=0, drop_always_solved_after=1)
    s.update([0], [1.0], [True])
    assert not s.active[0]
    np.testing.assert_allclose(s.probabilities(0), [1.0])
    assert s.sample(0, 2) == [0, 0]


def test_curriculum_pool_first_and_last_iteration():
    # labels (None -> 0.5): [0.1, 0.9, 0.5, 0.8, 0.3, 1.0, 0.6, 0.5]
    # easy first (descending, stable): [5, 1, 3, 6, 2, 7, 4, 0]
    s = PromptSampler(8, "curriculum", seed=0, total_iterations=5,
                      pass_rates=[0.1, 0.9, None, 0.8, 0.3, 1.0, 0.6, 0.5])
    # t = 0: f = 0.25 -> ceil(2.0) = 2 prompts
    assert s.curriculum_pool(0).tolist() == [5, 1]
    np.testing.assert_allclose(s.probabilities(0), [0, 0.5, 0, 0, 0, 0.5, 0, 0])
    assert sorted(s.sample(0, 2)) == [1, 5]
    # t = 2: f = 0.25 + 0.75 * 2/4 = 0.625 -> 5 prompts
    assert s.curriculum_pool(2).tolist() == [5, 1, 3, 6, 2]
    # t = 4 = T - 1: f = 1 -> all prompts
    assert s.curriculum_pool(4).tolist() == [5, 1, 3, 6, 2, 7, 4, 0]
    np.testing.assert_allclose(s.probabilities(4), [1 / 8] * 8)


def test_no_duplicates_within_one_call():
    s = PromptSampler(10, "prioritized", seed=3, pass_rates=[i / 10 for i in range(10)])
    assert sorted(s.sample(0, 10)) == list(range(10))
    draw = s.sample(1, 7)
    assert len(set(draw)) == 7
    # more than the support (3): rounds of 3, 3, 1 -> nobody more than ceil(7 / 3) = 3 times
    counts = Counter(PromptSampler(3, "uniform", seed=0).sample(0, 7))
    assert set(counts) == {0, 1, 2} and max(counts.values()) == 3 and sum(counts.values()) == 7


def test_state_dict_json_round_trip_reproduces_future_samples():
    def build(seed):
        return PromptSampler(20, "prioritized", seed=seed, pass_rates=[0.3] * 10 + [None] * 10,
                             drop_always_solved_after=2)

    original = build(7)
    for it in range(3):
        ids = original.sample(it, 6)
        original.update(ids, [1.0] * 3 + [0.25] * 3, [True] * 3 + [False] * 3)
    restored = build(12345)
    restored.load_state_dict(json.loads(json.dumps(original.state_dict())))
    np.testing.assert_array_equal(restored.active, original.active)
    for it in range(3, 8):
        a, b = original.sample(it, 6), restored.sample(it, 6)
        assert a == b
        original.update(a, [0.5] * 6, [False] * 6)
        restored.update(b, [0.5] * 6, [False] * 6)
    with pytest.raises(ValueError, match="mode"):
        PromptSampler(20, "uniform", seed=0).load_state_dict(original.state_dict())


def test_determinism_from_seed():
    def draws(seed):
        s = PromptSampler(50, "prioritized", seed=seed)
        return [s.sample(i, 10) for i in range(3)]

    assert draws(1) == draws(1)
    assert draws(1) != draws(2)


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown sampler mode 'easy'"):
        PromptSampler(3, "easy", seed=0)
    with pytest.raises(ValueError, match="pass_rates has 2 entries for 3 prompts"):
        PromptSampler(3, "curriculum", seed=0, pass_rates=[0.1, 0.2])

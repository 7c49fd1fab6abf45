"""The fused linear cross-entropy equals plain F.cross_entropy, and the chunked target
log-probabilities equal log_softmax: values and both gradients."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kimivl_rl.training.linear_cross_entropy import (linear_cross_entropy, linear_target_logprobs,
                                           loss_and_logit_grad)
from kimivl_rl.training.packing import IGNORE_INDEX


def _inputs(weight_grad: bool = True):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=generator, requires_grad=True)
    weight = torch.randn(50, 16, generator=generator, requires_grad=weight_grad)
    targets = torch.randint(0, 50, (37,), generator=generator)
    targets[[0, 5, 36]] = IGNORE_INDEX
    return hidden, weight, targets


def _reference(hidden, weight, targets):
    return F.cross_entropy(hidden @ weight.t(), targets, ignore_index=IGNORE_INDEX, reduction="sum")


@pytest.mark.parametrize("chunk_size", [8, 37, 100])
def test_value_and_gradients_match_cross_entropy(chunk_size):
    hidden, weight, targets = _inputs()
    fused = linear_cross_entropy(hidden, weight, targets, chunk_size=chunk_size)
    (fused / 3).backward()  # a scale after the loss reaches the stored gradients
    grads = hidden.grad, weight.grad
    hidden.grad = weight.grad = None
    expected = _reference(hidden, weight, targets)
    (expected / 3).backward()
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0], hidden.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1], weight.grad, rtol=1e-5, atol=1e-6)


def test_frozen_weight_gets_no_gradient():
    hidden, weight, targets = _inputs(weight_grad=False)
    linear_cross_entropy(hidden, weight, targets, chunk_size=8).backward()
    grad = hidden.grad
    hidden.grad = None
    _reference(hidden, weight, targets).backward()
    assert weight.grad is None
    torch.testing.assert_close(grad, hidden.grad, rtol=1e-5, atol=1e-6)


def test_all_targets_ignored_is_zero():
    hidden, weight, targets = _inputs()
    logits = (hidden @ weight.t()).detach()
    loss, grad = loss_and_logit_grad(logits, torch.full_like(targets, IGNORE_INDEX), IGNORE_INDEX)
    assert float(loss) == 0.0 and not grad.any()


def float32_tolerance(reference: torch.Tensor, terms: int) -> float:
    """Rounding of float32 sums of ``terms`` summands at the reference's magnitude (it grows as
    the square root of the count for independent rounding errors), with a factor 4 of margin."""
    return 4 * terms ** 0.5 * torch.finfo(torch.float32).eps * float(reference.detach().abs().max())


@pytest.mark.parametrize("chunk_size", [8, 37, 100])
def test_target_logprobs_and_gradients_match_log_softmax(chunk_size):
    hidden, weight, targets = _inputs()
    targets = targets.clamp(min=0)
    upstream = torch.randn(37, generator=torch.Generator().manual_seed(1))
    chunked = linear_target_logprobs(hidden, weight, targets, chunk_size=chunk_size)
    (chunked * upstream).sum().backward()
    grads = hidden.grad, weight.grad
    hidden.grad = weight.grad = None
    expected = torch.log_softmax(hidden @ weight.t(), -1).gather(1, targets[:, None])[:, 0]
    (expected * upstream).sum().backward()
    assert chunked.dtype == torch.float32 and chunked.shape == (37,)
    vocab, width = weight.shape
    torch.testing.assert_close(chunked, expected, rtol=0, atol=float32_tolerance(expected, vocab))
    for got, want in zip(grads, (hidden.grad, weight.grad)):
        torch.testing.assert_close(got, want, rtol=0, atol=float32_tolerance(want, vocab + width))


def test_target_logprobs_without_gradients_hold_nothing_for_backward():
    hidden, weight, targets = _inputs()
    with torch.no_grad():
        logprobs = linear_target_logprobs(hidden, weight, targets.clamp(min=0), chunk_size=8)
    assert logprobs.grad_fn is None and not logprobs.requires_grad

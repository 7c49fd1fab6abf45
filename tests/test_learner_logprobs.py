"""The learner's response log-probabilities (chunked vocabulary projection) equal the full-logits
computation they replace, in value and in every parameter's gradient, on the tiny VLM."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from kimivl_rl.config import load_config
from kimivl_rl.system.learner import encode_trajectory, response_logprobs
from kimivl_rl.models.families import family_of
from kimivl_rl.models.loading import load_policy
from kimivl_rl.training.packing import IGNORE_INDEX, collate_pack
from kimivl_rl.rl.experience import Trajectory
from test_linear_cross_entropy import float32_tolerance

TINY = "configs/tiny.yaml"
IMAGE_TOKENS = 16  # a 112-pixel image: 8x8 patches, merged 2x2


def full_logits_logprobs(model, sequences, family):
    """The learner's former path: float logits over the vocabulary at every position."""
    batch = collate_pack(sequences, family)
    batch.pop("labels")
    logits = model(**batch, use_cache=False).logits[0].float()
    out, start = [], 0
    for seq in sequences:
        positions = (seq.labels != IGNORE_INDEX).nonzero()[:, 0]
        logps = torch.log_softmax(logits[start + positions - 1], dim=-1)  # t predicts t + 1
        out.append(logps.gather(-1, seq.labels[positions][:, None])[:, 0])
        start += len(seq)
    return out


def _trajectories(config):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8))
    vision = [config.vision_start_token_id] + [config.image_token_id] * IMAGE_TOKENS + [config.vision_end_token_id]
    def text(n: int) -> list[int]:
        return rng.integers(10, 500, n).tolist()  # ordinary vocabulary tokens
    return [Trajectory(0, vision + text(5), text(9), [0.0] * 9, "stop", [image]),
            Trajectory(0, text(4), text(12), [0.0] * 12, "length")]


def _grads(model) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def test_response_logprobs_and_gradients_equal_the_full_logits_path(tiny_model_dir):
    model, processor = load_policy(str(tiny_model_dir), load_config(TINY), training=True)
    model.eval()  # no dropout: both passes see the same function
    family = family_of(model)
    sequences = [encode_trajectory(t, processor, family) for t in _trajectories(model.config)]
    weights = torch.randn(21, generator=torch.Generator().manual_seed(0))  # an arbitrary upstream gradient

    chunked = response_logprobs(model, sequences, family)
    (torch.cat(chunked) * weights).sum().backward()
    chunked_grads = _grads(model)
    full = full_logits_logprobs(model, sequences, family)
    (torch.cat(full) * weights).sum().backward()
    full_grads = _grads(model)

    text_config = model.config.text_config
    assert [len(lp) for lp in chunked] == [9, 12]
    for got, want in zip(chunked, full, strict=True):
        # a log-sum-exp over the vocabulary
        torch.testing.assert_close(got, want, rtol=0, atol=float32_tolerance(want, text_config.vocab_size))
    assert chunked_grads.keys() == full_grads.keys()
    for name, want in full_grads.items():
        # the projection's sums run over the vocabulary and the hidden size
        terms = text_config.vocab_size + text_config.hidden_size
        torch.testing.assert_close(chunked_grads[name], want, rtol=0, atol=float32_tolerance(want, terms),
                                   msg=name)


def test_the_first_steps_forward_pass_gives_log_pi_old_as_a_separate_no_grad_pass_would(tiny_model_dir):
    """The learner takes log π_old from its first optimizer step's forward passes (training mode,
    autograd on) instead of a separate pass before it (evaluation mode, no autograd): the two
    agree, because the step is taken only after the last micro-batch and no layer of a
    supported family behaves differently in training."""
    model, processor = load_policy(str(tiny_model_dir), load_config(TINY), training=True)
    family = family_of(model)
    sequences = [encode_trajectory(t, processor, family) for t in _trajectories(model.config)]
    model.train()
    first_step = response_logprobs(model, sequences, family)
    assert all(lp.requires_grad for lp in first_step)
    model.eval()
    with torch.no_grad():
        separate = response_logprobs(model, sequences, family)
    vocab = model.config.text_config.vocab_size
    for got, want in zip(first_step, separate, strict=True):
        torch.testing.assert_close(got.detach(), want, rtol=0, atol=float32_tolerance(want, vocab))

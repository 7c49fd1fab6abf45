"""The learner's response log-probabilities (chunked vocabulary projection) equal the full-logits
computation they replace, in value and in every parameter's gradient, on the tiny VLM."""
from __future__ import annotations

import pickle
from dataclasses import replace

import numpy as np
import torch
from PIL import Image

from kimivl_rl.config import load_config
from kimivl_rl.system.learner import encode_trajectories, response_logprobs
from kimivl_rl.models.families import family_of
from kimivl_rl.models.loading import language_model, load_policy
from kimivl_rl.training.engine import enable_gradient_checkpointing
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
    sequences = encode_trajectories(_trajectories(model.config), processor, family)
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
    sequences = encode_trajectories(_trajectories(model.config), processor, family)
    model.train()
    first_step = response_logprobs(model, sequences, family)
    assert all(lp.requires_grad for lp in first_step)
    model.eval()
    with torch.no_grad():
        separate = response_logprobs(model, sequences, family)
    vocab = model.config.text_config.vocab_size
    for got, want in zip(first_step, separate, strict=True):
        torch.testing.assert_close(got.detach(), want, rtol=0, atol=float32_tolerance(want, vocab))


def test_responses_to_one_image_share_one_vision_pass_with_the_same_logprobs_and_gradients(tiny_model_dir):
    """A group's k responses show the same image: ``encode_trajectories`` gives them one tensor,
    ``collate_pack`` packs it once and the vision encoder sees each distinct image once, with
    the log-probabilities and every gradient of encoding each response's copy on its own."""
    model, processor = load_policy(str(tiny_model_dir), load_config(TINY), training=True)
    model.eval()
    family = family_of(model)
    first, other = _trajectories(model.config)
    rng = np.random.default_rng(1)
    second = Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8))
    group = [first, other, Trajectory(0, first.prompt_token_ids, first.response_token_ids[::-1],
                                      [0.0] * 9, "stop", first.images),
             Trajectory(1, first.prompt_token_ids, first.response_token_ids, [0.0] * 9, "stop", [second]),
             Trajectory(0, first.prompt_token_ids, first.response_token_ids[:4], [0.0] * 4, "stop",
                        first.images)]
    shared = encode_trajectories(group, processor, family)
    # the controller ships a batch as one object (ray.put pickles it whole): the sharing survives
    shipped = encode_trajectories(pickle.loads(pickle.dumps(group)), processor, family)
    assert shipped[0].pixel_values is shipped[2].pixel_values is shipped[4].pixel_values
    assert shipped[3].pixel_values is not shipped[0].pixel_values and shipped[1].pixel_values is None
    copies = [replace(s, pixel_values=s.pixel_values.clone()) if s.pixel_values is not None else s
              for s in shared]
    batch = collate_pack(shared, family)
    assert batch["image_sources"].tolist() == [0, 0, 1, 0]  # rows of the two distinct images
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8]] * 2
    assert "image_sources" not in collate_pack(copies, family)
    patches = []
    model.model.visual.register_forward_pre_hook(lambda module, args: patches.append(len(args[0])))
    weights = torch.randn(9 + 12 + 9 + 9 + 4, generator=torch.Generator().manual_seed(0))

    results = []
    for sequences in (shared, copies):
        logprobs = response_logprobs(model, sequences, family)
        (torch.cat(logprobs) * weights).sum().backward()
        results.append((logprobs, _grads(model)))
    assert patches == [2 * 64, 4 * 64]  # 8x8 patches per image, encoded once vs once per response

    (got, got_grads), (want, want_grads) = results
    text_config = model.config.text_config
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=float32_tolerance(w, text_config.vocab_size))
    assert got_grads.keys() == want_grads.keys()
    for name, w in want_grads.items():
        # sums over the vocabulary, the hidden size and the patches of the shared image
        terms = text_config.vocab_size + text_config.hidden_size + 4 * 64
        torch.testing.assert_close(got_grads[name], w, rtol=0, atol=float32_tolerance(w, terms), msg=name)


def test_gradient_checkpointing_runs_each_decoder_layer_again_in_backward_with_the_same_gradients(
        tiny_model_dir):
    """``rl.gradient_checkpointing`` (``enable_gradient_checkpointing``) on the learner's own loss
    path: each language-model layer's forward runs once more during backward, and the
    log-probabilities and gradients are those of the plain pass."""
    model, processor = load_policy(str(tiny_model_dir), load_config(TINY), training=True)
    family = family_of(model)
    sequences = encode_trajectories(_trajectories(model.config), processor, family)
    weights = torch.randn(21, generator=torch.Generator().manual_seed(0))
    layers = language_model(model).layers
    calls = []
    for layer in layers:
        layer.register_forward_pre_hook(lambda module, args: calls.append(module))
    results = []
    for checkpointed in (False, True):
        if checkpointed:
            enable_gradient_checkpointing(model)
        calls.clear()
        logprobs = response_logprobs(model, sequences, family)
        forward_calls = len(calls)
        (torch.cat(logprobs) * weights).sum().backward()
        results.append((logprobs, _grads(model), forward_calls, len(calls)))
    (plain, plain_grads, *plain_calls), (got, got_grads, *got_calls) = results
    assert model.training and plain_calls == [len(layers)] * 2 and got_calls == [len(layers), 2 * len(layers)]
    for g, w in zip(got, plain, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert got_grads.keys() == plain_grads.keys()
    for name, want in plain_grads.items():
        torch.testing.assert_close(got_grads[name], want, rtol=0, atol=float32_tolerance(want, 1), msg=name)

"""Cross-entropy and target log-probabilities of a vocabulary projection without the
(tokens x vocabulary) logits.

``linear_cross_entropy(hidden, weight, targets)`` equals
``F.cross_entropy(hidden @ weight.T, targets, ignore_index=-100, reduction="sum")``. The forward
goes over chunks of tokens: it makes one chunk's logits, reduces them to the chunk's loss, and at
once turns them into that chunk's gradients with respect to ``hidden`` and ``weight`` (softmax
minus one-hot, times the chunk's hidden states or the weight), as Liger-kernel's fused linear
cross-entropy does. Backward only scales the stored gradients, so the vocabulary matmul runs three
times per token (checkpointed chunks run it four times) and at most one chunk's logits exist.
On GPU the elementwise part of a chunk (float cast, log-sum-exp, softmax minus one-hot, cast
back) is compiled, so that it reads the chunk's logits a few times instead of writing several
float copies of them.

``linear_target_logprobs(hidden, weight, targets)`` equals
``log_softmax(hidden @ weight.T, -1).gather(-1, targets)``: one log-probability per token, which
the RL losses combine per token and per response. Its gradient depends on each token's upstream
gradient, so it cannot be made ahead in the forward; the forward keeps each token's
log-sum-exp and the backward makes each chunk's logits once more (four vocabulary matmuls per
token, still at most one chunk's logits at a time).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from kimivl_rl.models.families import inner_model
from kimivl_rl.training.packing import IGNORE_INDEX


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_size: int = 4096, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Summed cross-entropy of ``hidden @ weight.T`` (tokens, vocabulary) against ``targets``;
    targets equal to ``ignore_index`` add nothing. A float32 scalar."""
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_size, ignore_index)


def linear_target_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                           chunk_size: int = 4096) -> torch.Tensor:
    """log softmax(``hidden @ weight.T``)[target] of every token (every target must be a
    vocabulary index); float32, shape (tokens,)."""
    return _LinearTargetLogprobs.apply(hidden, weight, targets, chunk_size)


def target_rows(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(next-token targets, positions that carry loss) of a packed (1, T) label row. Call it on
    the host copy of the labels: finding the rows on a GPU would wait for the device."""
    targets = labels[0, 1:]
    return targets, (targets != IGNORE_INDEX).nonzero()[:, 0]


def loss_position_hidden(model, inputs: dict, rows: torch.Tensor) -> torch.Tensor:
    """Final hidden states at the positions that predict a target (``rows`` of ``target_rows``)."""
    inner = inner_model(model)
    return inner(**shared_image_inputs(inner, inputs), use_cache=False).last_hidden_state[0, :-1][rows]


def shared_image_inputs(inner, inputs: dict) -> dict:
    """``inputs`` of a pack whose images repeat (``image_sources`` of ``collate_pack``), with
    each distinct image encoded once: its features fill every placeholder that shows it, and
    their gradients add up in the vision encoder as if each copy had been encoded."""
    if "image_sources" not in inputs:
        return inputs
    inputs = dict(inputs)
    sources, grid = inputs.pop("image_sources"), inputs["image_grid_thw"]
    features = inner.get_image_features(inputs.pop("pixel_values"), grid, return_dict=True)
    features.pooler_output = tuple(features.pooler_output[i] for i in sources.tolist())
    return {**inputs, "image_grid_thw": grid[sources], "mm_encoder_outputs": {"image": features}}


def _vocabulary_head(model) -> tuple[torch.nn.Module, bool]:
    """The output projection of ``model`` (maybe a DeepSpeed engine), and whether ZeRO-3
    partitions its weight (then it is gathered only inside the module's own forward)."""
    head = getattr(model, "module", model).lm_head
    return head, hasattr(head.weight, "ds_id")


def causal_lm_loss_sum(model, inputs: dict, targets: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy of one packed sequence over ``rows`` (from
    ``target_rows``): the final hidden states go through the vocabulary projection chunk by
    chunk, so neither the (tokens x vocabulary) logits nor their float copy are ever made, and
    positions without loss are never projected. ``model`` may be a DeepSpeed engine; under
    ZeRO-3 the projection runs as the module itself (full logits of the loss positions only)."""
    hidden = loss_position_hidden(model, inputs, rows)
    head, partitioned = _vocabulary_head(model)
    if partitioned:
        return F.cross_entropy(head(hidden).float(), targets[rows], reduction="sum")
    return linear_cross_entropy(hidden, head.weight, targets[rows])


def causal_lm_target_logprobs(model, inputs: dict, targets: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """log p(target | prefix) of one packed sequence at ``rows`` (from ``target_rows``), in
    order, through the vocabulary projection chunk by chunk (as ``causal_lm_loss_sum``)."""
    hidden = loss_position_hidden(model, inputs, rows)
    head, partitioned = _vocabulary_head(model)
    if partitioned:
        logits = head(hidden).float()
        return logits.gather(1, targets[rows][:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
    return linear_target_logprobs(hidden, head.weight, targets[rows])


def _softmax_minus_one_hot(logits_f: torch.Tensor, lse: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """d(log-sum-exp - target logit) / d logits, row by row, in float32."""
    hit = torch.arange(logits_f.shape[1], device=logits_f.device) == target[:, None]
    return torch.exp(logits_f - lse[:, None]) - hit.float()


def loss_and_logit_grad(logits: torch.Tensor, targets: torch.Tensor,
                        ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk's summed cross-entropy (float32) and its gradient with respect to the logits
    (softmax minus one-hot, zero on ignored rows) in the logits' dtype."""
    logits_f = logits.float()
    valid = targets != ignore_index
    target = torch.where(valid, targets, 0)
    lse = torch.logsumexp(logits_f, dim=-1)
    loss = ((lse - logits_f.gather(1, target[:, None])[:, 0]) * valid).sum()
    grad = _softmax_minus_one_hot(logits_f, lse, target) * valid[:, None]
    return loss, grad.to(logits.dtype)


def logprob_and_lse(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk's target log-probabilities and log-sum-exps, float32."""
    logits_f = logits.float()
    lse = torch.logsumexp(logits_f, dim=-1)
    return logits_f.gather(1, targets[:, None])[:, 0] - lse, lse


def logprob_logit_grad(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                       grad_logprobs: torch.Tensor) -> torch.Tensor:
    """One chunk's gradient with respect to the logits, given the upstream gradient of each
    target log-probability, in the logits' dtype."""
    grad = _softmax_minus_one_hot(logits.float(), lse, targets) * -grad_logprobs[:, None]
    return grad.to(logits.dtype)


@functools.cache
def _compiled(fn):
    return torch.compile(fn, dynamic=True)


def _elementwise(fn, like: torch.Tensor):
    """``fn`` compiled on GPU (one fused pass over a chunk's logits), as is on CPU."""
    return _compiled(fn) if like.is_cuda else fn


def _chunks(rows: int, chunk_size: int) -> list[slice]:
    return [slice(start, start + chunk_size) for start in range(0, rows, chunk_size)]


def _grad_buffers(ctx, hidden: torch.Tensor, weight: torch.Tensor):
    want_hidden, want_weight = ctx.needs_input_grad[:2]
    return (torch.empty_like(hidden) if want_hidden else None,
            torch.zeros_like(weight) if want_weight else None)


def _add_chunk_grads(grads, chunk: slice, grad_logits: torch.Tensor, hidden: torch.Tensor,
                     weight: torch.Tensor) -> None:
    """Turn one chunk's logit gradient into its hidden-state rows and the weight's sum."""
    grad_hidden, grad_weight = grads
    if grad_hidden is not None:
        torch.mm(grad_logits, weight, out=grad_hidden[chunk])
    if grad_weight is not None:
        grad_weight.addmm_(grad_logits.t(), hidden[chunk])


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, ignore_index):
        grads = _grad_buffers(ctx, hidden, weight)
        chunk_loss = _elementwise(loss_and_logit_grad, hidden)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for chunk in _chunks(hidden.shape[0], chunk_size):
            loss, grad = chunk_loss(hidden[chunk] @ weight.t(), targets[chunk], ignore_index)
            total += loss
            _add_chunk_grads(grads, chunk, grad, hidden, weight)
        ctx.save_for_backward(*grads)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grads = (None if g is None else g * grad_output for g in ctx.saved_tensors)
        return (*grads, None, None, None)


class _LinearTargetLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size):
        logprobs = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logprobs)
        chunk_logprobs = _elementwise(logprob_and_lse, hidden)
        for chunk in _chunks(hidden.shape[0], chunk_size):
            logprobs[chunk], lse[chunk] = chunk_logprobs(hidden[chunk] @ weight.t(), targets[chunk])
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk_size = chunk_size
        return logprobs

    @staticmethod
    def backward(ctx, grad_logprobs):
        hidden, weight, targets, lse = ctx.saved_tensors
        grads = _grad_buffers(ctx, hidden, weight)
        chunk_grad = _elementwise(logprob_logit_grad, hidden)
        for chunk in _chunks(hidden.shape[0], ctx.chunk_size):
            grad = chunk_grad(hidden[chunk] @ weight.t(), targets[chunk], lse[chunk],
                              grad_logprobs[chunk])
            _add_chunk_grads(grads, chunk, grad, hidden, weight)
        return (*grads, None, None)

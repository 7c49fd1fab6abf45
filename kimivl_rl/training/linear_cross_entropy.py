"""Cross-entropy of a vocabulary projection without the (tokens x vocabulary) logits, and
without recomputing them in backward.

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
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from kimivl_rl.training.packing import IGNORE_INDEX, inner_model


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_size: int = 4096, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Summed cross-entropy of ``hidden @ weight.T`` (tokens, vocabulary) against ``targets``;
    targets equal to ``ignore_index`` add nothing. A float32 scalar."""
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_size, ignore_index)


def target_rows(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(next-token targets, positions that carry loss) of a packed (1, T) label row. Call it on
    the host copy of the labels: finding the rows on a GPU would wait for the device."""
    targets = labels[0, 1:]
    return targets, (targets != IGNORE_INDEX).nonzero()[:, 0]


def loss_position_hidden(model, inputs: dict, rows: torch.Tensor) -> torch.Tensor:
    """Final hidden states at the positions that predict a target (``rows`` of ``target_rows``)."""
    return inner_model(model)(**inputs, use_cache=False).last_hidden_state[0, :-1][rows]


def causal_lm_loss_sum(model, inputs: dict, targets: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy of one packed sequence over ``rows`` (from
    ``target_rows``): the final hidden states go through the vocabulary projection chunk by
    chunk, so neither the (tokens x vocabulary) logits nor their float copy are ever made, and
    positions without loss are never projected. ``model`` may be a DeepSpeed engine; under
    ZeRO-3 the projection runs as the module itself (full logits of the loss positions only)."""
    hidden = loss_position_hidden(model, inputs, rows)
    head = getattr(model, "module", model).lm_head
    if hasattr(head.weight, "ds_id"):
        # ZeRO-3 partitions the weight and gathers it only inside the module's own forward.
        return F.cross_entropy(head(hidden).float(), targets[rows], reduction="sum")
    return linear_cross_entropy(hidden, head.weight, targets[rows])


def loss_and_logit_grad(logits: torch.Tensor, targets: torch.Tensor,
                        ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk's summed cross-entropy (float32) and its gradient with respect to the logits
    (softmax minus one-hot, zero on ignored rows) in the logits' dtype."""
    logits_f = logits.float()
    valid = targets != ignore_index
    target = torch.where(valid, targets, 0)
    lse = torch.logsumexp(logits_f, dim=-1)
    loss = ((lse - logits_f.gather(1, target[:, None])[:, 0]) * valid).sum()
    hit = torch.arange(logits.shape[1], device=logits.device) == target[:, None]
    grad = (torch.exp(logits_f - lse[:, None]) - hit.float()) * valid[:, None]
    return loss, grad.to(logits.dtype)


@functools.cache
def _compiled_loss_and_logit_grad():
    return torch.compile(loss_and_logit_grad, dynamic=True)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, ignore_index):
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight) if want_weight else None
        chunk_loss = _compiled_loss_and_logit_grad() if hidden.is_cuda else loss_and_logit_grad
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            rows = hidden[start:start + chunk_size]
            loss, grad = chunk_loss(rows @ weight.t(), targets[start:start + chunk_size],
                                    ignore_index)
            total += loss
            if want_hidden:
                torch.mm(grad, weight, out=grad_hidden[start:start + chunk_size])
            if want_weight:
                grad_weight.addmm_(grad.t(), rows)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grads = (None if g is None else g * grad_output for g in ctx.saved_tensors)
        return (*grads, None, None, None)

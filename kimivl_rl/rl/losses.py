"""Policy losses, selected by name from ``LOSSES``.

All losses share one signature::

    loss_fn(logprobs, old_logprobs, response_mask, advantages, normalizer, cfg,
            rollout_logprobs=None) -> (scalar loss, metrics)

``logprobs (B, T)`` are the log-probs of the sampled tokens under the current policy,
``old_logprobs (B, T)`` the same under the sampling policy (treated as constants),
``response_mask (B, T)`` marks response tokens (prompt and padding are 0; their values are
ignored, even if -inf or NaN), ``advantages (B,)`` come from the loss's advantage estimator.
``rollout_logprobs (B, T)``, the rollout engine's log-probs of the same tokens, give the truncated
importance weight ``min(pi_old / pi_rollout, cfg.is_cap)`` when ``cfg.is_cap`` is set: the
correction for samples drawn by an engine whose weights or numerics differ from the learner's.

The loss is a SUM over the micro-batch divided by ``normalizer``, the number of responses
(``normalize_by="responses"``) or response tokens (``"tokens"``) of the WHOLE global batch.
The learner splits a batch into token-budgeted micro-batches and accumulates gradients; with a
global normalizer the sum of the micro-batch losses equals the full-batch loss exactly, which a
per-micro-batch mean would not. Metrics are plain floats describing the micro-batch itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch

from kimivl_rl.rl.advantages import ADVANTAGE_ESTIMATORS

Normalization = Literal["responses", "tokens"]


@dataclass(frozen=True)
class LossConfig:
    """``tau``: weight of Kimi PMD's squared log-ratio regulariser (k1.5's tau, > 0).
    ``clip_eps``: GRPO's PPO clip range epsilon. ``dual_clip``: GRPO's bound c on the ratio of
    a negative-advantage token (verl's and OpenRLHF's clip_ratio_c); None: off. ``is_cap``: the
    bound C of the truncated importance weight min(pi_old / pi_rollout, C); None: off."""
    tau: float = 0.1
    clip_eps: float = 0.2
    dual_clip: Optional[float] = None
    is_cap: Optional[float] = None


LossFn = Callable[..., tuple[torch.Tensor, dict[str, float]]]  # the signature above


@dataclass(frozen=True)
class LossSpec:
    """A registered loss with the advantage estimator and the normalisation it expects."""
    name: str
    fn: LossFn
    advantage: str
    normalize_by: Normalization

    def normalizer(self, num_responses: int, num_tokens: int) -> float:
        """The global normalizer for a batch of that many responses and response tokens."""
        return float(num_responses if self.normalize_by == "responses" else num_tokens)


LOSSES: dict[str, LossSpec] = {}
# What the learner reports from every update, whichever loss runs (0 where a loss lacks one).
# kl_ref: the mean over responses of their summed per-token KL to the reference (rl.kl_coef;
# the learner reports the iteration's first update's: the policy before the iteration's steps).
LOSS_METRICS = ("loss", "logprob_diff_abs_mean", "clip_fraction", "is_weight_mean", "kl_ref")


def register_loss(name: str, advantage: str = "group_mean",
                  normalize_by: Normalization = "responses") -> Callable[[LossFn], LossFn]:
    """Register ``fn`` under ``name``; the advantage estimator must already be registered."""
    if advantage not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"loss {name!r}: unknown advantage estimator {advantage!r}; "
                         f"registered: {', '.join(sorted(ADVANTAGE_ESTIMATORS))}")
    if normalize_by not in ("responses", "tokens"):
        raise ValueError(f"loss {name!r}: normalize_by must be 'responses' or 'tokens', "
                         f"got {normalize_by!r}")

    def decorator(fn: LossFn) -> LossFn:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is already registered")
        LOSSES[name] = LossSpec(name, fn, advantage, normalize_by)
        return fn
    return decorator


def get_loss(name: str) -> LossSpec:
    """The loss registered as ``name``; the error lists the registered names."""
    if name not in LOSSES:
        raise KeyError(f"unknown loss {name!r}; registered: {', '.join(sorted(LOSSES))}")
    return LOSSES[name]


def pad_rows(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) values and mask from ragged rows (one per response): the losses' layout."""
    width = max(1, max(len(r) for r in rows))
    values = torch.zeros(len(rows), width, device=rows[0].device)
    mask = torch.zeros(len(rows), width, device=rows[0].device)
    for i, row in enumerate(rows):
        values[i, :len(row)] = row
        mask[i, :len(row)] = 1.0
    return values, mask


def _prepare(logprobs: torch.Tensor, old_logprobs: torch.Tensor, response_mask: torch.Tensor,
             advantages: torch.Tensor, normalizer: float
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate shapes, zero non-response positions (so no -inf/NaN there reaches the loss or
    its gradient) and detach the constants ``old_logprobs`` and ``advantages``."""
    if logprobs.dim() != 2 or not logprobs.shape == old_logprobs.shape == response_mask.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)}, old_logprobs "
                         f"{tuple(old_logprobs.shape)} and response_mask "
                         f"{tuple(response_mask.shape)} must be equal (B, T) shapes")
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(f"advantages {tuple(advantages.shape)} must be (B,) with "
                         f"B={logprobs.shape[0]}")
    if not normalizer > 0:
        raise ValueError(f"normalizer must be > 0, got {normalizer}")
    mask = response_mask.bool()
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    new = torch.where(mask, logprobs, zero)
    old = torch.where(mask, old_logprobs.detach().to(logprobs.dtype), zero)
    return new, old, mask, advantages.detach().to(logprobs.dtype)


def truncated_is_weight(old: torch.Tensor, rollout_logprobs: Optional[torch.Tensor],
                        mask: torch.Tensor, cap: Optional[float]) -> Optional[torch.Tensor]:
    """``min(exp(old - rollout), cap)`` per token (0 off the response), as verl's truncated
    importance sampling; for a sequence-level loss pass summed (B, 1) log-probs. None when off."""
    if cap is None or rollout_logprobs is None:
        return None
    rollout = torch.where(mask, rollout_logprobs.detach().to(old.dtype), torch.zeros_like(old))
    return torch.where(mask, torch.exp(old - rollout).clamp(max=cap), torch.zeros_like(old))


def _weight_mean(weight: Optional[torch.Tensor], mask: torch.Tensor) -> float:
    """Mean importance weight over the masked entries (1.0 when no weight is applied)."""
    if weight is None or not mask.any():
        return 1.0
    return (weight[mask].sum() / mask.sum()).item()


def _seq_diff_abs_mean(new: torch.Tensor, old: torch.Tensor) -> float:
    """Mean over sequences of |log pi(y|x) - log pi_old(y|x)|: how far the policy has moved."""
    return (new.sum(-1) - old.sum(-1)).abs().mean().item() if new.shape[0] else 0.0


def reference_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, response_mask: torch.Tensor
                 ) -> torch.Tensor:
    """Per-token KL of the policy from a reference, the k3 estimator (GRPO's and verl's
    ``low_var_kl``): ``exp(r - p) - (r - p) - 1`` with ``p``, ``r`` the sampled token's
    log-probs under the policy and the reference; >= 0, unbiased for KL(pi || ref) on samples
    of pi. Its gradient per token is ``(1 - exp(r - p)) * grad p``; 0 off the response."""
    mask = response_mask.bool()
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    log_ratio = torch.where(mask, ref_logprobs.detach().to(logprobs.dtype) - logprobs, zero)
    return torch.where(mask, torch.exp(log_ratio) - log_ratio - 1.0, zero)


@register_loss("kimi_pmd", advantage="group_mean", normalize_by="responses")
def kimi_pmd(logprobs: torch.Tensor, old_logprobs: torch.Tensor, response_mask: torch.Tensor,
             advantages: torch.Tensor, normalizer: float, cfg: LossConfig,
             rollout_logprobs: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Kimi k1.5 policy mirror descent on SEQUENCE log-probs::

        loss = sum_j [ -A_j * log pi(y_j|x) + tau/2 * (log pi(y_j|x) - log pi_old(y_j|x))^2 ]
               / normalizer

    with ``A_j = r_j - mean(group)`` (a constant). The squared term keeps the update close to
    pi_old, replacing a trust region; its gradient per response token is
    ``(-A_j + tau * (seq_logp_j - seq_old_j)) / normalizer``. With ``cfg.is_cap`` each
    response's loss is weighted by min(pi_old(y_j|x) / pi_rollout(y_j|x), cap), a sequence ratio.
    """
    new, old, mask, adv = _prepare(logprobs, old_logprobs, response_mask, advantages, normalizer)
    seq_new, seq_old = new.sum(-1), old.sum(-1)
    per_response = -adv * seq_new + 0.5 * cfg.tau * (seq_new - seq_old).square()
    responses = mask.any(-1, keepdim=True)
    rollout = None if rollout_logprobs is None else \
        torch.where(mask, rollout_logprobs.to(old.dtype), torch.zeros_like(old)).sum(-1, keepdim=True)
    weight = truncated_is_weight(seq_old.unsqueeze(-1), rollout, responses, cfg.is_cap)
    if weight is not None:
        per_response = per_response * weight.squeeze(-1)
    loss = per_response.sum() / normalizer
    return loss, {"loss": loss.item(), "logprob_diff_abs_mean": _seq_diff_abs_mean(new, old),
                  "is_weight_mean": _weight_mean(weight, responses)}


@register_loss("grpo", advantage="group_norm", normalize_by="tokens")
def grpo(logprobs: torch.Tensor, old_logprobs: torch.Tensor, response_mask: torch.Tensor,
         advantages: torch.Tensor, normalizer: float, cfg: LossConfig,
         rollout_logprobs: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO: PPO-clip per token with the response's group-normalised advantage::

        ratio = exp(logp - logp_old)
        loss  = sum_tokens -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) / normalizer

    a token-level mean over the global batch. With ``dual_clip`` c, a token with A < 0 costs at
    most -c * A: a stale sample whose ratio has grown past c cannot push its loss up without
    bound. ``clip_fraction`` is the share of response tokens whose clipped branch is active
    (ratio past 1+eps with A > 0, below 1-eps with A < 0, or past c with A < 0), i.e. tokens
    that get no gradient. With ``cfg.is_cap`` each token's loss is weighted by
    min(pi_old / pi_rollout, cap) of that token.
    """
    new, old, mask, adv = _prepare(logprobs, old_logprobs, response_mask, advantages, normalizer)
    ratio = torch.exp(new - old)
    adv_tok = adv.unsqueeze(-1)
    unclipped = ratio * adv_tok
    clipped = ratio.clamp(1.0 - cfg.clip_eps, 1.0 + cfg.clip_eps) * adv_tok
    per_token = -torch.minimum(unclipped, clipped)
    is_clipped = ((ratio > 1.0 + cfg.clip_eps) & (adv_tok > 0)) | \
                 ((ratio < 1.0 - cfg.clip_eps) & (adv_tok < 0))
    if cfg.dual_clip is not None:
        negative = adv_tok < 0
        per_token = torch.where(negative, torch.minimum(per_token, -cfg.dual_clip * adv_tok), per_token)
        is_clipped |= negative & (ratio > cfg.dual_clip)
    per_token = torch.where(mask, per_token, torch.zeros_like(ratio))
    weight = truncated_is_weight(old, rollout_logprobs, mask, cfg.is_cap)
    if weight is not None:
        per_token = per_token * weight
    loss = per_token.sum() / normalizer
    tokens = int(mask.sum())
    clip_fraction = (is_clipped & mask).sum().item() / tokens if tokens else 0.0
    return loss, {"loss": loss.item(), "logprob_diff_abs_mean": _seq_diff_abs_mean(new, old),
                  "clip_fraction": clip_fraction, "is_weight_mean": _weight_mean(weight, mask)}

"""The learner group: N DeepSpeed ranks as Ray actors in one torch.distributed group.

Each rank gets the whole iteration's trajectories (one object-store reference), takes its
shard, and:
  1. computes advantages over the whole batch with the loss's registered estimator;
  2. takes ``rl.updates_per_iteration`` optimizer steps on the registered loss, over
     micro-batches packed up to ``rl.micro_batch_tokens`` tokens. log π_old of the sampled
     tokens (its weights before the iteration: the rollout policy when samples are fresh, as
     the engines are synced after every update; with ``rl.max_staleness`` the samples may be
     older, which ``rl.truncated_is_cap`` corrects for) comes from the first step's forward
     passes, which all run under those weights (the step is taken after the last micro-batch),
     as verl does on-policy: no extra forward pass.
Only response tokens carry loss. The loss is normalised by the global count of responses or
tokens, so the update does not depend on how the batch is split over ranks and micro-batches.
With ``rl.kl_coef``, each rank's frozen copy of the starting policy scores the iteration's
response tokens once, for the KL term added to the loss.
"""
from __future__ import annotations

import logging
import os
from functools import partial
from typing import Optional

import torch
import torch.distributed as dist

from kimivl_rl.config import Config, config_from_dict
from kimivl_rl.infra.ipc_weight_sync import RingSender
from kimivl_rl.infra.weight_sync import LOOPBACK, listen, new_weight_group, send_weights
from kimivl_rl.models.families import family_of
from kimivl_rl.models.loading import load_policy
from kimivl_rl.rl.advantages import get_advantage
from kimivl_rl.rl.experience import Trajectory
from kimivl_rl.rl.losses import LOSS_METRICS, LossConfig, get_loss, pad_rows, reference_kl
from kimivl_rl.rl.schedule import rl_lr
from kimivl_rl.training.engine import (build_engine, enable_gradient_checkpointing, process_group_backend,
                                       full_state_dict, load_engine_state, reset_optimizer,
                                       save_engine_state, save_pretrained)
from kimivl_rl.training.linear_cross_entropy import causal_lm_target_logprobs, target_rows
from kimivl_rl.training.packing import IGNORE_INDEX, Encoded, collate_pack

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- pure pieces

def encode_trajectories(trajectories: list[Trajectory], processor, family) -> list[Encoded]:
    """Each trajectory's prompt + response ids as one sequence whose labels are the response
    tokens, for the model ``family`` is bound to. The responses to one prompt share one tensor
    of its images (the same image objects), so a pack encodes them once (``collate_pack``)."""
    images: dict[tuple[int, ...], tuple] = {(): (None, None)}
    sequences = []
    for t in trajectories:
        key = tuple(map(id, t.images))
        if key not in images:
            images[key] = family.encode_images(processor, t.images)
        pixel_values, grid = images[key]
        input_ids = torch.tensor(t.prompt_token_ids + t.response_token_ids)
        labels = torch.tensor([IGNORE_INDEX] * len(t.prompt_token_ids) + t.response_token_ids)
        sequences.append(Encoded(input_ids, labels, pixel_values, grid, family.positions(input_ids, grid),
                                 source=f"prompt {t.prompt_index}"))
    return sequences


def token_budget_batches(lengths: list[int], budget: int) -> list[list[int]]:
    """Consecutive indices grouped so each group's total length stays within ``budget``
    (a longer sequence goes alone)."""
    batches: list[list[int]] = []
    used = budget
    for index, length in enumerate(lengths):
        if used + length > budget:
            batches.append([])
            used = 0
        batches[-1].append(index)
        used += length
    return batches


def response_logprobs(model, sequences: list[Encoded], family) -> list[torch.Tensor]:
    """log p(token | prefix) of each sequence's response tokens, from one packed forward whose
    vocabulary projection runs chunk by chunk (no full float logits)."""
    batch = collate_pack(sequences, family)
    targets, rows = target_rows(batch.pop("labels"))
    inputs = {k: v.to(model.device) for k, v in batch.items()}
    logprobs = causal_lm_target_logprobs(model, inputs, targets.to(model.device), rows.to(model.device))
    # collate_pack drops each sequence's first label: it has no prefix inside the sequence
    return list(logprobs.split([int((s.labels[1:] != IGNORE_INDEX).sum()) for s in sequences]))


def rollout_mismatch(trajectories: list[Trajectory], learner: list[torch.Tensor]) -> float:
    """Mean |log p| difference per response token, over all ranks, between the rollout engine
    that sampled and the learner's weights: near 0 when the last weight sync arrived intact."""
    totals = torch.zeros(2, dtype=torch.float64)
    for trajectory, logprobs in zip(trajectories, learner):
        rollout = torch.tensor(trajectory.rollout_logprobs, dtype=torch.float64)
        totals += torch.stack([(rollout - logprobs.cpu().double()).abs().sum(),
                               torch.tensor(float(len(rollout)), dtype=torch.float64)])
    dist.all_reduce(totals)
    return (totals[0] / totals[1].clamp(min=1)).item()


# ----------------------------------------------------------------------------- the actor

class LearnerWorker:
    """One rank of the learner group (wrapped as a Ray actor by ``kimivl_rl.system.actors``)."""

    def __init__(self, config: dict, model_path: str, rank: int, world_size: int):
        self.cfg: Config = config_from_dict(config)
        self.model_path = model_path
        self.rank, self.world = rank, world_size
        self.weight_group = None  # rank 0's group with the rollout engines (CollectiveTransport)
        self.ring: Optional[RingSender] = None  # rank 0's ring to a colocated engine (IPCTransport)
        if self.cfg.cluster.learner_threads:
            # Ray gives an actor of fractional CPUs one thread, but rollouts and learning take
            # turns, so on a small machine the learner may use the cores the rollouts left idle.
            torch.set_num_threads(self.cfg.cluster.learner_threads)

    def ready(self) -> bool:
        return True

    def rendezvous_address(self) -> tuple[str, int]:
        """Rank 0's node address and a free port there, for the process group."""
        import socket

        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def init_group(self, master_addr: str, master_port: int) -> int:
        """Join the torch.distributed group (all ranks at once), then build the engine."""
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world), LOCAL_RANK="0")
        dist.init_process_group(process_group_backend(self.cfg.cluster.use_gpu), rank=self.rank,
                                world_size=self.world)
        torch.manual_seed(self.cfg.seed)
        model, self.processor = load_policy(self.model_path, self.cfg, training=True)
        if self.cfg.rl.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        self.family = family_of(model)
        self.loss = get_loss(self.cfg.rl.loss)
        self.loss_cfg = LossConfig(tau=self.cfg.rl.tau, clip_eps=self.cfg.rl.grpo_clip,
                                  dual_clip=self.cfg.rl.grpo_dual_clip,
                                  is_cap=self.cfg.rl.truncated_is_cap)
        self.engine = build_engine(model, partial(rl_lr, self.cfg.rl.lr, self.cfg.rl.lr_warmup_steps),
                                   zero_stage=self.cfg.rl.zero_stage,
                                   bf16=self.cfg.cluster.use_gpu,
                                   offload_optimizer=self.cfg.rl.offload_optimizer)
        self.reference = self._load_reference() if self.cfg.rl.kl_coef else None
        return self.rank

    def _load_reference(self):
        """The starting policy, frozen, for rl.kl_coef: ``model_path`` is the run's starting
        model on a resume too (the checkpoint is loaded into the engine afterwards). Loaded as
        for training, so its packed forward runs the learner's attention kernel."""
        reference, _ = load_policy(self.model_path, self.cfg, training=True)
        return reference.eval().requires_grad_(False).to(self.engine.device)

    # ------------------------------------------------------------------ learning

    def _encode(self, trajectories: list[Trajectory]) -> list[Encoded]:
        return encode_trajectories(trajectories, self.processor, self.family)

    def _micro_batches(self, sequences: list[Encoded]) -> list[list[Encoded]]:
        """Token-budget micro-batches, the same count on every rank (collectives must match):
        a rank with fewer repeats its first batch with zero weight."""
        groups = token_budget_batches([len(s) for s in sequences], self.cfg.rl.micro_batch_tokens)
        count = torch.tensor(len(groups))
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        batches = [[sequences[i] for i in g] for g in groups]
        return batches + [None] * (int(count) - len(batches))

    def learn(self, trajectories: list[Trajectory]) -> dict[str, float]:
        """One RL iteration's update; returns metrics averaged over ranks, and the tokens (prompt
        and response) each update trained on."""
        rewards = torch.tensor([t.reward for t in trajectories])
        groups = torch.tensor([t.prompt_index for t in trajectories])
        advantages = get_advantage(self.cfg.rl.advantage or self.loss.advantage)(rewards, groups)
        normalizer = self.loss.normalizer(len(trajectories),
                                          sum(len(t.response_token_ids) for t in trajectories))
        mine = [trajectories[i] for i in range(self.rank, len(trajectories), self.world)]
        batches = self._micro_batches(self._encode(mine))
        my_advantages = advantages[self.rank::self.world]
        # the engines' log-probs, for the truncated importance weight only
        sampled = [torch.tensor(t.rollout_logprobs) for t in mine] if self.loss_cfg.is_cap else None
        reference = self._reference_logprobs(batches)
        old: Optional[list[torch.Tensor]] = None
        updates: list[dict[str, float]] = []
        lr = self.engine.get_lr()[0]  # the iteration's first update's (rl.lr_warmup_steps)
        for _ in range(self.cfg.rl.updates_per_iteration):
            metrics, old = self._update(batches, old, sampled, reference, my_advantages, normalizer)
            updates.append(metrics)
        if self.cfg.rl.reset_optimizer_each_iteration:
            # now rather than at the next iteration: a colocated engine gets the moments' memory
            reset_optimizer(self.engine)
        if self.cfg.cluster.colocate and torch.cuda.is_available():
            torch.cuda.empty_cache()  # the engine wakes into what this process held cached
        # kl_ref as the iteration starts: the policy before its steps
        return {**updates[-1], "lr": lr, "kl_ref": updates[0]["kl_ref"],
                "rollout_logprob_diff_abs_mean": rollout_mismatch(mine, old),
                "learner_tokens": sum(len(t.prompt_token_ids) + len(t.response_token_ids)
                                      for t in trajectories)}

    def _reference_logprobs(self, batches) -> Optional[list[torch.Tensor]]:
        """This rank's responses' log-probs under the frozen starting policy, in batch order
        (None when rl.kl_coef is off)."""
        if self.reference is None:
            return None
        with torch.no_grad():
            return [lp for batch in batches if batch
                    for lp in response_logprobs(self.reference, batch, self.family)]

    def _update(self, batches, old: Optional[list[torch.Tensor]], sampled: Optional[list[torch.Tensor]],
                reference: Optional[list[torch.Tensor]], advantages: torch.Tensor, normalizer: float
                ) -> tuple[dict[str, float], list[torch.Tensor]]:
        """One optimizer step over the micro-batches; ``old`` are this rank's responses'
        log-probs before the iteration's first step (None: this is that step, and its forward
        passes give them), ``sampled`` the rollout engine's and ``reference`` the starting
        policy's (None: not needed), in the same order. Returns the metrics and ``old``."""
        sums = dict.fromkeys(LOSS_METRICS, 0.0)
        offset, first_pass = 0, []
        for i, batch in enumerate(batches):
            self.engine.set_gradient_accumulation_boundary(i == len(batches) - 1)
            sequences = batch or next(b for b in batches if b)
            weight = 1.0 if batch else 0.0
            n = len(sequences)
            logprobs = response_logprobs(self.engine, sequences, self.family)
            new_lp, mask = pad_rows(logprobs)
            rows = slice(offset, offset + n) if batch else slice(0, n)
            if old is None:
                old_lp = new_lp.detach()
                first_pass += [lp.detach() for lp in logprobs] if batch else []
            else:
                old_lp = pad_rows(old[rows])[0].to(new_lp.device)
            sampled_lp = pad_rows(sampled[rows])[0].to(new_lp.device) if sampled else None
            loss, parts = self.loss.fn(new_lp, old_lp, mask, advantages[rows].to(new_lp.device),
                                       normalizer, self.loss_cfg, rollout_logprobs=sampled_lp)
            if reference:
                kl = reference_kl(new_lp, pad_rows(reference[rows])[0].to(new_lp.device), mask).sum(-1)
                loss = loss + self.cfg.rl.kl_coef * kl.sum() / normalizer
                parts["kl_ref"] = kl.mean().item()
            # DeepSpeed averages gradients over ranks; the loss is already a global mean.
            self.engine.backward(loss * weight * self.world)
            self.engine.step()
            offset += n if batch else 0
            for key in sums:
                sums[key] += weight * parts.get(key, 0.0) * (n if key != "loss" else 1)
        totals = torch.tensor([*sums.values(), float(offset)], dtype=torch.float64)
        dist.all_reduce(totals)
        *summed, responses = totals.tolist()
        # the loss is already a global mean; the others are per-response means
        return ({key: value if key == "loss" else value / max(1.0, responses)
                 for key, value in zip(sums, summed)}, first_pass if old is None else old)

    # ------------------------------------------------------------------ weights and state

    def state_for_sync(self) -> Optional[dict[str, torch.Tensor]]:
        """The full weights (rank 0; None elsewhere) for the rollout engines, each tensor with a
        storage of its own: under ZeRO-1/2 every parameter is a view into one flat buffer, and
        Ray pickles a view with its whole storage (docs/experiments.md, "An RL iteration")."""
        state = full_state_dict(self.engine)
        if state is None:
            return None
        # Only views are copied: ZeRO-3's gathered tensors already own their storage.
        return {name: t if t.untyped_storage().nbytes() == t.nbytes else t.clone()
                for name, t in self.family.checkpoint_layout(state).items()}

    def weight_group_address(self, single_node: bool) -> tuple[str, int]:
        """Rank 0: where the weight-update group meets (loopback when the whole cluster is this
        node, else this node's address), and a free port there, held open for the group's store."""
        import ray

        host = LOOPBACK if single_node else ray.util.get_node_ip_address()
        self.weight_listener = listen(host)
        return host, self.weight_listener.getsockname()[1]

    def init_weight_update_group(self, host: str, port: int, world_size: int, backend: str,
                                 timeout_s: float) -> None:
        """Rank 0 forms the group with the rollout engines' workers (they join concurrently),
        in place of any group formed before."""
        self.weight_group = new_weight_group(host, port, 0, world_size, backend, timeout_s,
                                             listener=self.weight_listener, replacing=self.weight_group)

    def _weights_to_send(self) -> Optional[dict[str, torch.Tensor]]:
        """The full weights in the checkpoint's layout on rank 0, None elsewhere (every rank is
        called because gathering them is a collective under ZeRO-3)."""
        state = full_state_dict(self.engine)
        return None if state is None or self.rank != 0 else self.family.checkpoint_layout(state)

    def broadcast_weights(self) -> int:
        """The full weights to the weight-update group (rank 0 sends); returns the bytes sent."""
        weights = self._weights_to_send()
        if weights is None:
            return 0
        return send_weights(self.weight_group, weights, self.cfg.cluster.weight_bucket_bytes,
                            self.engine.device)

    def open_weight_ring(self) -> tuple:
        """Rank 0: a new ring of weight buffers on this rank's device for the colocated engine,
        in place of any before; returns its invitation (``RingSender.invitation``)."""
        if self.ring is not None:
            self.ring.close()
        self.ring = RingSender(self._weights_to_send(), self.cfg.cluster.weight_bucket_bytes,
                               self.engine.device, self.cfg.cluster.call_timeout_s)
        return self.ring.invitation()

    def accept_weight_ring(self) -> None:
        self.ring.accept()

    def send_weights_through_ring(self) -> int:
        """The full weights through the ring (rank 0 sends); returns the bytes sent."""
        weights = self._weights_to_send()
        return 0 if weights is None else self.ring.send(weights)

    def sequence_logprobs(self, trajectories: list[Trajectory]) -> list[list[float]]:
        """Per-token log-probabilities of whole responses (for checks and tests)."""
        with torch.no_grad():
            return [lp.tolist() for lp in response_logprobs(self.engine.module, self._encode(trajectories),
                                                             self.family)]

    def export(self, directory: str) -> None:
        """The policy as a Hugging Face checkpoint (rank 0 writes)."""
        save_pretrained(self.engine, directory, self.processor)

    def save(self, directory: str) -> None:
        save_engine_state(self.engine, directory)

    def load(self, directory: str) -> None:
        load_engine_state(self.engine, directory)

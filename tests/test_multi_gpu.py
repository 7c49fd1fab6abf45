"""On a host with 2 or more NVIDIA GPUs (skipped elsewhere, as tests/test_gpu.py is): the RL loop
with each role on GPUs of its own, learner ranks (DeepSpeed ZeRO-2 or ZeRO-3) on some and vLLM
engines on the others (one GPU each, or two with tensor parallelism), the weights broadcast over
NCCL in buckets after every update (cluster.weight_transport=collective); and the faults of
tests/test_fault_tolerance.py and tests/test_learner_recovery.py on GPUs, where a dead process
leaves its peers inside an NCCL collective (gloo on CPU tells them at once, NCCL does not).

A case needs num_learners + rollout.num_workers x rollout.tensor_parallel_size GPUs and is skipped,
saying how many, on a host with fewer: 2 GPUs run one learner rank beside one engine, 3 add the
tensor-parallel engine, two engines and two learner ranks, 4 the two-rank ZeRO-2 and ZeRO-3 loops.
Ray finds the GPUs itself: conftest's ``ray_cluster`` does not set num_gpus.

    pytest -m multi_gpu -s tests/test_multi_gpu.py    # bench/README.md keeps the last output
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pytest
import torch

import kimivl_rl.infra.remote as remote
from kimivl_rl.infra.layout import OutputLayout
from kimivl_rl.infra.metrics import read_jsonl
from kimivl_rl.infra.remote import RunStopped
from kimivl_rl.system.actors import RLActors
from test_fault_tolerance import _kill_after_first_submit
from test_learner_recovery import _kill_learner_during_update
from test_rl_ray import rl_cfg

GPUS = torch.cuda.device_count()
pytestmark = [pytest.mark.multi_gpu,
              pytest.mark.skipif(GPUS < 2, reason=f"needs 2 or more CUDA GPUs; this host has {GPUS}")]

BF16_GAP = 2**-5  # nats per token, mean engine-learner gap: the one-GPU tests' bound (test_gpu.py)
# cluster.call_timeout_s of the fault tests: time for a vLLM engine to start (or restart) on a
# GPU, and the NCCL timeout of the weight-update group, so a wait on a dead peer ends within it
FAULT_TIMEOUT_S = 180


@dataclass(frozen=True)
class Layout:
    """Learner ranks (a GPU each) and rollout engines (tensor_parallel_size GPUs each)."""
    learners: int = 1
    zero_stage: int = 2
    engines: int = 1
    tp: int = 1

    @property
    def gpus(self) -> int:
        return self.learners + self.engines * self.tp

    @property
    def name(self) -> str:
        return f"{self.learners}learner-zero{self.zero_stage}-{self.engines}engine-tp{self.tp}"

    def overrides(self) -> list[str]:
        return ["cluster.use_gpu=true", "cluster.weight_transport=collective",
                f"cluster.weight_bucket_bytes={256 * 1024}",  # the tiny model in many broadcasts
                f"cluster.num_learners={self.learners}", f"rl.zero_stage={self.zero_stage}",
                f"rollout.num_workers={self.engines}", f"rollout.tensor_parallel_size={self.tp}",
                # conftest's cluster has 2 CPUs; the largest layout's actors and the reward's fit
                "cluster.learner_cpus=0.25", "cluster.rollout_cpus=0.25"]

    def actor_gpus(self) -> dict[str, int]:
        return {**{f"learner-{rank}": 1 for rank in range(self.learners)},
                **{f"rollout-{i}": self.tp for i in range(self.engines)}}

    def param(self):
        return pytest.param(self, id=self.name, marks=pytest.mark.skipif(
            GPUS < self.gpus, reason=f"{self.name} needs {self.gpus} GPUs (num_learners {self.learners} + "
                                     f"num_workers {self.engines} x tensor_parallel_size {self.tp}); "
                                     f"this host has {GPUS}"))


def trained(cfg) -> list[dict]:
    """The metrics of each trained iteration, as the run logged them."""
    return [r for r in read_jsonl(OutputLayout.of(cfg).metrics("rl")) if "reward_mean" in r]


def show(title: str, records: list[dict]) -> None:
    print(f"\n{title}")
    for r in records:
        print({k: r[k] for k in ("step", "time_generate_s", "time_learn_s", "time_sync_s", "restarts_rollout",
                                 "restarts_learner", "rollout_logprob_diff_abs_mean")})


def assert_every_update_trained_and_synced(summary: dict, records: list[dict]) -> None:
    """Each iteration trained once, and its rollouts (from the weights of the sync before it)
    scored as the learner's bf16 weights do."""
    assert summary["iterations"] == 3 and [r["step"] for r in records] == [1, 2, 3]
    assert all(r["rollout_logprob_diff_abs_mean"] <= BF16_GAP for r in records)


def _record_gpus(monkeypatch) -> dict[str, list[str]]:
    """Each RL actor's GPUs (Ray's ids), asked of it once the actors have started."""
    import ray

    gpus, wait_started = {}, RLActors._wait_started

    def recording(actors: RLActors) -> None:
        wait_started(actors)
        named = [*(f"learner-{r}" for r in range(len(actors.learners))),
                 *(f"rollout-{i}" for i in range(len(actors.rollouts)))]
        for name, actor in zip(named, [*actors.learners, *actors.rollouts]):
            gpus[name] = [str(i) for i in ray.get(actor.__ray_call__.remote(lambda _: ray.get_gpu_ids()))]

    monkeypatch.setattr(RLActors, "_wait_started", recording)
    return gpus


@pytest.mark.parametrize("layout", [Layout().param(), Layout(tp=2).param(),
                                    Layout(learners=2, engines=2).param(),
                                    Layout(learners=2, zero_stage=3, engines=2).param()])
def test_rl_with_learners_and_engines_on_gpus_of_their_own(layout, tmp_path, tiny_model_dir,
                                                           small_data_dir, ray_cluster, monkeypatch):
    """Three RL iterations, each learner rank on a GPU and each engine on tensor_parallel_size
    others (asked of every actor: no GPU shared), the weights broadcast over NCCL from learner
    rank 0 to every vLLM worker in 256 KiB buckets after each update: every iteration's rollouts,
    over all engines and scored by all ranks, are within bf16's reach of the learner (as on one
    GPU), so each sync before the last reached every engine, every tensor-parallel rank of it,
    whole; then the final model is exported (under ZeRO-3, gathered from the ranks)."""
    from kimivl_rl.system.controller import run_rl

    gpus = _record_gpus(monkeypatch)
    cfg = rl_cfg(tmp_path, tiny_model_dir, small_data_dir, "rl.iterations=3", "rl.checkpoint_every=3",
                 "rl.eval_every=3", *layout.overrides())
    summary = run_rl(cfg, cfg.model.path)
    records = trained(cfg)
    show(f"{layout.name}: Ray's GPU ids {gpus}", records)
    assert {name: len(ids) for name, ids in gpus.items()} == layout.actor_gpus()
    every = [i for ids in gpus.values() for i in ids]
    assert len(set(every)) == len(every) == layout.gpus
    assert_every_update_trained_and_synced(summary, records)
    assert (OutputLayout.of(cfg).model("rl") / "model.safetensors").is_file()


# ----------------------------------------------------------------------------- faults

def recovered_or_stopped(tmp_path, tiny_model_dir, small_data_dir, layout) -> Optional[list[dict]]:
    """RL through a fault, a checkpoint after each iteration and every wait bounded by
    FAULT_TIMEOUT_S: the trained iterations' metrics if the run recovered (then it ends as an
    unbroken run does), None if it stopped with the one paragraph the CLI prints for
    ``RunStopped`` (what died, and where a rerun of the same command resumes)."""
    from kimivl_rl.system.controller import run_rl

    cfg = rl_cfg(tmp_path, tiny_model_dir, small_data_dir, "rl.iterations=3", "rl.checkpoint_every=1",
                 "rl.eval_every=3", f"cluster.call_timeout_s={FAULT_TIMEOUT_S}", *layout.overrides())
    try:
        summary = run_rl(cfg, cfg.model.path)
    except RunStopped as exc:
        print(f"\n{layout.name}: stopped: {exc}")
        assert "\n" not in str(exc) and "rerunning the same command" in str(exc)
        return None
    records = trained(cfg)
    show(f"{layout.name}: recovered", records)
    assert_every_update_trained_and_synced(summary, records)
    return records


@pytest.mark.parametrize("layout", [Layout().param(), Layout(tp=2).param(), Layout(engines=2).param()])
def test_engine_killed_mid_sync_on_gpus_is_restarted_or_the_run_stops_in_one_paragraph(
        layout, tmp_path, tiny_model_dir, small_data_dir, ray_cluster, monkeypatch):
    """SIGKILL of rollout-0 while weights version 2 are broadcast over NCCL, leaving learner rank 0
    (and the other engine) inside the broadcast with a dead peer: as on CPU, Ray restarts the
    engine, a new weight-update group forms and the sync is done again, so the later rollouts
    score as the learner does; or the run stops in one paragraph. Never a hang or a traceback."""
    import ray

    killed = _kill_after_first_submit(monkeypatch, "receive weights version 2",
                                      lambda: ray.get_actor("rollout-0"), caller=remote)
    records = recovered_or_stopped(tmp_path, tiny_model_dir, small_data_dir, layout)
    assert killed
    if records is not None:
        assert records[-1]["restarts_rollout"] >= 1


@pytest.mark.parametrize("layout", [Layout().param(), Layout(learners=2).param()])
def test_learner_killed_mid_update_on_gpus_is_rebuilt_or_the_run_stops_in_one_paragraph(
        layout, tmp_path, tiny_model_dir, small_data_dir, ray_cluster, monkeypatch):
    """SIGKILL of learner rank 0 during iteration 1's update (with two ranks, rank 1 is left inside
    DeepSpeed's NCCL collectives): as on CPU (test_learner_recovery.py) the learner group is
    rebuilt from iteration 1's checkpoint, the engines are given its weights over a new NCCL group,
    and the run ends with every update; or it stops in one paragraph. Never a hang."""
    killed = _kill_learner_during_update(monkeypatch, 1)
    records = recovered_or_stopped(tmp_path, tiny_model_dir, small_data_dir, layout)
    assert killed
    if records is not None:
        assert [r["restarts_learner"] for r in records] == [0, 1, 1]

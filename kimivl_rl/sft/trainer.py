"""One SFT stage (joint or long-CoT) as a Ray Train ``TorchTrainer`` over DeepSpeed ranks.

The driver (``run_stage``) starts the Ray Train job, then evaluates the exported checkpoint on
the held-out split. Each worker (``train_loop``) encodes the data, builds the shared step plan,
wraps the model in a DeepSpeed engine and trains, reporting metrics and checkpoints to Ray
Train; a rerun of the same stage continues from the last reported checkpoint.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from kimivl_rl.infra.checkpoint import verify_manifest, write_manifest
from kimivl_rl.config import Config, config_from_dict, config_to_dict
from kimivl_rl.training.linear_cross_entropy import causal_lm_loss_sum, target_rows
from kimivl_rl.training.engine import (build_engine, enable_gradient_checkpointing, load_engine_state,
                                       process_group_backend, save_engine_state, save_pretrained)
from kimivl_rl.evaluation import format_report
from kimivl_rl.infra.layout import OutputLayout
from kimivl_rl.infra.metrics import MetricsSink, detail_level, follow_progress
from kimivl_rl.models.families import family_of
from kimivl_rl.models.loading import attention_implementation, compile_decoder_layers, load_policy
from kimivl_rl.training.packing import collate_pack
from kimivl_rl.infra.ray_runtime import init_ray
from kimivl_rl.sft.encode import encode_example, renders_reasoning
from kimivl_rl.sft.plan import StagePlan, Step, build_plan
from kimivl_rl.sft.sources import ensure_solved_rows, stage_examples

log = logging.getLogger(__name__)
STAGES = ("joint", "long_cot")
REPORT_EVERY = 10


# ----------------------------------------------------------------------------- paths

def stage_input_model(cfg: Config, stage: str, base_model: str,
                      override: Optional[str] = None) -> str:
    """Joint SFT starts from the base model, long-CoT SFT from joint SFT's output; ``override``
    (``kimivl-rl sft --model``) replaces either."""
    if override:
        return override
    if stage == "joint":
        return base_model
    previous = OutputLayout.of(cfg).model("joint")
    if not (previous / "config.json").is_file():
        raise FileNotFoundError(f"long-CoT SFT starts from joint SFT's output, and {previous} "
                                f"does not exist yet: run `kimivl-rl sft CONFIG --stage joint` first")
    return str(previous)


# ----------------------------------------------------------------------------- worker side

def answer_loss_sum(engine, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed cross-entropy over answer tokens of one pack (``batch`` on the host)."""
    targets, rows = target_rows(batch.pop("labels"))
    device = engine.device
    return causal_lm_loss_sum(engine, _to_device(batch, device), targets.to(device), rows.to(device))


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def train_step(engine, plan: StagePlan, step: Step, rank: int, world: int, accum: int,
               family) -> dict[str, float]:
    """One optimizer step: this rank's packs, loss normalised by the global answer tokens."""
    started = time.perf_counter()
    local_sum = torch.zeros((), dtype=torch.float64)
    for index in range(rank * accum, (rank + 1) * accum):
        loss_sum = answer_loss_sum(engine, collate_pack(plan.pack(step, index), family))
        # DeepSpeed averages gradients over ranks and accumulation steps; scaling by
        # world * accum / global_tokens makes the result the exact global token mean.
        engine.backward(loss_sum * world * accum / max(1, step.label_tokens))
        engine.step()
        local_sum += loss_sum.detach().double().cpu()
    dist.all_reduce(local_sum)
    seconds = time.perf_counter() - started
    return {"loss": float(local_sum) / max(1, step.label_tokens),
            "lr": engine.get_lr()[0], "phase": step.phase,
            "tokens_per_s": step.tokens / seconds,
            "packing_efficiency": step.tokens / step.slots}


def _restore(engine) -> int:
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as directory:
        verify_manifest(directory)
        load_engine_state(engine, directory)
        step = json.loads((Path(directory) / "trainer_state.json").read_text())["step"]
    log.info("resumed at step %d from %s", step, checkpoint.path)
    return step


def ray_train_log_level(cfg: Config) -> str:
    """Ray Train's console level: its INFO lines (worker group starts, each checkpoint, each
    report as ``TrainingReport(...)``) only with ``output.verbose``; warnings always."""
    return "INFO" if cfg.output.verbose else "WARNING"


def set_report_log_level(cfg: Config) -> None:
    """In a worker: Ray Train logs each report at INFO through a logger named after its module's
    file, which RunConfig's LoggingConfig (the ``ray.train`` loggers) does not reach."""
    from ray.train.v2._internal.execution import context

    context.logger.setLevel(ray_train_log_level(cfg))


def _report(metrics: dict, engine, step: int, checkpoint: bool) -> None:
    import ray.train

    if not checkpoint:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as directory:
        save_engine_state(engine, directory)
        (Path(directory) / "trainer_state.json").write_text(json.dumps({"step": step}))
        write_manifest(Path(directory))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def train_loop(loop_config: dict) -> None:
    """The Ray Train worker function."""
    import ray.train

    logging.basicConfig(level=logging.INFO)
    cfg: Config = config_from_dict(loop_config["config"])
    set_report_log_level(cfg)
    stage = loop_config["stage"]
    stage_cfg = getattr(cfg.sft, stage)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(cfg.seed)

    model, processor = load_policy(loop_config["input_model"], cfg, training=True)
    if cfg.sft.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if cfg.sft.compile_layers:
        compile_decoder_layers(model)
    family = family_of(model)
    fold = None if renders_reasoning(processor) else (cfg.model.think_open, cfg.model.think_close)
    examples = [encode_example(ex, processor, family, fold) for ex in stage_examples(cfg, stage)]
    plan = build_plan(examples, stage_cfg.phases, world * cfg.sft.grad_accum_steps, seed=cfg.seed,
                      overlong=cfg.sft.overlong, image_token_id=family.image_token_id)
    freeze = (family.vision_prefixes if cfg.sft.freeze_vision else ()) + \
             (family.projector_prefixes if cfg.sft.freeze_projector else ())
    engine = build_engine(model, plan.lr, zero_stage=cfg.sft.zero_stage,
                          grad_accum_steps=cfg.sft.grad_accum_steps,
                          weight_decay=cfg.sft.weight_decay, bf16=cfg.cluster.use_gpu,
                          freeze_prefixes=freeze)
    start = _restore(engine)
    sink = MetricsSink.for_stage(cfg, stage) if rank == 0 else None
    total = len(plan.steps)
    for step_index in range(start, total):
        metrics = train_step(engine, plan, plan.steps[step_index], rank, world,
                             cfg.sft.grad_accum_steps, family)
        metrics.update(step=step_index + 1, total_steps=total)
        done = step_index + 1
        if sink:
            sink.log(done, metrics)
        if rank == 0 and (done % REPORT_EVERY == 0 or done == total):
            log.log(detail_level(cfg), "sft %s step %d/%d loss %.4f lr %.2e %.0f tok/s packing "
                    "%.2f", stage, done, total, metrics["loss"], metrics["lr"],
                    metrics["tokens_per_s"], metrics["packing_efficiency"])
        checkpoint = done % cfg.sft.checkpoint_every == 0 or done == total
        # A Ray Train report is a round trip through its controller (about a second): every
        # step goes to metrics.jsonl and TensorBoard, every 10th and each checkpoint to Ray.
        if checkpoint or done % REPORT_EVERY == 0:
            _report(metrics, engine, done, checkpoint)
    _export(engine, processor, OutputLayout.of(cfg).model(stage), plan, rank)
    if sink:
        sink.close()


def _export(engine, processor, out_dir: Path, plan: StagePlan, rank: int) -> None:
    """The stage's Hugging Face checkpoint, written under a temporary name and renamed."""
    staging = out_dir.with_name(out_dir.name + ".partial")
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
    save_pretrained(engine, staging, processor)
    if rank == 0:
        (staging / "sft_plan.json").write_text(json.dumps(plan.report, indent=1))
        shutil.rmtree(out_dir, ignore_errors=True)
        staging.rename(out_dir)


# ----------------------------------------------------------------------------- driver side

def run_stage(cfg: Config, stage: str, base_model: str, check: bool = True,
              input_model: Optional[str] = None) -> dict:
    """Train one SFT stage on Ray Train (from ``input_model`` if given, else
    ``stage_input_model``'s), evaluate it, and return its summary.

    A stage whose summary exists is finished and is not run again; an interrupted one
    continues from its last Ray Train checkpoint. Unless ``check`` is False (the caller
    already did it and fitted the config, ``checked_config``), every row of the stage's data is
    checked first, so a bad row stops the stage with a ``DataError`` naming ``file:line`` before
    Ray starts or anything is written.
    """
    from kimivl_rl.prepare import checked_config

    if stage not in STAGES:
        raise ValueError(f"unknown SFT stage {stage!r}; choose one of {STAGES}")
    summary_file = OutputLayout.of(cfg).stage_summary(stage)
    if summary_file.is_file():
        log.info("SFT %s already finished (%s); skipping", stage, summary_file)
        return json.loads(summary_file.read_text())
    if check:
        cfg = checked_config(cfg, [stage])
    summary = train_stage(cfg, stage, base_model, input_model)
    summary["eval"] = evaluate_stage(cfg, stage)
    summary_file.write_text(json.dumps(summary, indent=1, default=str))
    log.info("SFT %s done, held-out:\n%s", stage, format_report(summary["eval"]))
    return summary


def train_stage(cfg: Config, stage: str, base_model: str,
                input_model: Optional[str] = None) -> dict:
    """The Ray Train job of a stage alone (continuing a stopped one); no evaluation."""
    input_model = stage_input_model(cfg, stage, base_model, input_model)
    layout = OutputLayout.of(cfg)
    layout.stage(stage).mkdir(parents=True, exist_ok=True)
    init_ray(cfg)
    summary = {"stage": stage, "input_model": input_model}
    if getattr(cfg.sft, stage).keep_solved:
        summary["solved_rows"] = ensure_solved_rows(cfg, stage, input_model)
    result = _fit(cfg, stage, input_model, layout)
    output = layout.model(stage)
    return {**summary, "output_model": str(output), "train": result.metrics,
            "plan": json.loads((output / "sft_plan.json").read_text())}


def evaluate_stage(cfg: Config, stage: str) -> dict:
    """The held-out report (``evaluation_report``, greedy) of the stage's exported model, in
    vLLM, as a Ray task with the rollout workers' resources."""
    from kimivl_rl.evaluation import on_rollout_resources

    init_ray(cfg)
    return on_rollout_resources(cfg, _evaluate_model, stage, step=f"evaluate SFT {stage}")


def _evaluate_model(config: dict, stage: str) -> dict:
    from kimivl_rl.evaluation import evaluate_model

    cfg = config_from_dict(config)
    return evaluate_model(config, str(OutputLayout.of(cfg).model(stage)),
                          str(Path(cfg.data.dir) / getattr(cfg.sft, stage).eval_file),
                          cfg.sft.eval_examples, samples=0,
                          max_new_tokens=cfg.sft.eval_max_new_tokens)


def _fit(cfg: Config, stage: str, input_model: str, layout: OutputLayout):
    from ray.train import CheckpointConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    log.info("SFT %s: %s -> %s (attention: %s)", stage, input_model, layout.model(stage),
             attention_implementation(cfg.cluster.use_gpu, training=True))
    run_dir = layout.ray_train_run(stage)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"config": config_to_dict(cfg), "stage": stage, "input_model": input_model},
        scaling_config=ScalingConfig(num_workers=cfg.sft.num_workers, use_gpu=cfg.cluster.use_gpu,
                                     resources_per_worker={"CPU": cfg.sft.cpus_per_worker}),
        torch_config=TorchConfig(backend=process_group_backend(cfg.cluster.use_gpu)),
        run_config=RunConfig(name=run_dir.name, storage_path=str(run_dir.parent),
                             checkpoint_config=CheckpointConfig(
                                 num_to_keep=cfg.output.keep_last_checkpoints),
                             logging_config=LoggingConfig(log_level=ray_train_log_level(cfg))),
    )
    with follow_progress(layout.metrics(stage), f"SFT {stage}", unit="step"):
        return trainer.fit()

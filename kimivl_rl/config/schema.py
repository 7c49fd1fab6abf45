"""The one configuration tree of kimivl-rl, as typed dataclasses.

Every field has a type the loader enforces, and numeric fields may carry bounds in their
metadata (``ge``/``gt``/``le``). Defaults describe the built-in tiny run; ``configs/*.yaml``
override them per scenario.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union


def bounded(default, *, ge=None, gt=None, le=None):
    """A field whose value the loader checks against inclusive/exclusive bounds."""
    return field(default=default, metadata={"ge": ge, "gt": gt, "le": le})


def ray_resources():
    """Ray custom resources an actor asks for ({name: amount}); each amount must be positive."""
    return field(default_factory=dict, metadata={"gt": 0.0})


@dataclass
class ModelConfig:
    # A local directory or a hub name. A missing local directory is built as the tiny
    # model when ``init_if_missing`` is set (the built-in default run needs no download).
    path: str = "runs/tiny/model"
    init_if_missing: bool = True
    init_seed: int = 0
    # The architecture (kimivl_rl/models/families): auto reads a local model's config.json;
    # it is also the architecture of a tiny model built here. A hub name needs it set.
    family: Literal["auto", "qwen2_5_vl", "kimi_k25", "kimi_vl"] = "auto"
    trust_remote_code: bool = False
    # Thinking-section markers; Kimi's own checkpoints use "◁think▷" and "◁/think▷".
    think_open: str = "<think>"
    think_close: str = "</think>"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


# Where a row's prompt goes in data.prompt_template.
TEMPLATE_SLOT = "{problem}"


@dataclass
class DataConfig:
    dir: str = "runs/tiny/data"
    build_if_missing: bool = True
    seed: int = 0
    joint_sft_examples: int = bounded(2000, ge=1)
    long_cot_examples: int = bounded(400, ge=1)
    rl_prompts: int = bounded(600, ge=1)
    eval_examples: int = bounded(100, ge=1)
    image_size: int = bounded(112, ge=28)
    max_difficulty: int = bounded(5, ge=1, le=5)
    # The built-in tasks' share of arithmetic (text at difficulty 1-2, counted from an image at
    # 3-5); the rest split evenly between counting and colour questions.
    arith_fraction: float = bounded(0.5, ge=0.0, le=1.0)
    # Images above this many pixels are resized down (keeping aspect) or rejected.
    max_pixels: int = bounded(448 * 448, ge=28 * 28)
    oversize_images: Literal["resize", "reject"] = "resize"
    bad_rows: Literal["error", "skip"] = "error"
    # The shape of the rows of every data file (SFT, RL prompts, evaluation): the project's own
    # "messages" (TRL's chat rows too), EasyR1's, verl's or LLaVA's; auto tells them apart by
    # their keys, per file (kimivl_rl/data/formats.py).
    format: Literal["auto", "messages", "easyr1", "verl", "llava"] = "auto"
    # EasyR1 rows' columns (its own names and defaults): the question text holding <image>
    # placeholders, the reference answer, and the images; image_key also names the images
    # column of verl and messages rows.
    prompt_key: str = "problem"
    answer_key: str = "answer"
    image_key: str = "images"
    # A format instruction around each row's first user turn, "{problem}" standing for its text
    # (e.g. "{problem} Put the final answer in \\boxed{}."); "" leaves prompts as they are.
    prompt_template: str = ""


@dataclass
class PhaseConfig:
    max_seq_len: int = bounded(1024, ge=16)
    epochs: float = bounded(1.0, gt=0.0)
    lr_peak: float = bounded(5e-4, gt=0.0)
    lr_final: float = bounded(5e-5, ge=0.0)
    warmup_steps: int = bounded(10, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"


@dataclass
class SFTStageConfig:
    train_file: str = ""
    eval_file: str = ""
    # Rows of another stage's training file mixed into this one ("" for none), e.g. joint-SFT
    # answers replayed during long-CoT SFT so that a small model keeps what joint SFT taught.
    # The model then also knows how to answer without thinking, and RL with a length penalty
    # can move it there (docs/experiments.md).
    replay_file: str = ""
    replay_examples: int = bounded(0, ge=0)   # the first N rows of replay_file
    # A system message for every replayed row, so the model tells the replayed mode (answering
    # without thinking) from the stage's own; without one a small model mixes them
    # (docs/experiments.md).
    replay_system_prompt: str = ""
    # Train only on the stage's own rows whose prompt its starting model already answers
    # correctly (greedy, scored by the answer-only reward): rejection sampling against the
    # student, so a small model does not memorise answers it cannot compute (kimivl_rl/sft/sources.py).
    keep_solved: bool = False
    # With keep_solved: the share of the other rows kept anyway, evenly spaced, so that kinds
    # of question the model never solves still have traces to follow.
    unsolved_fraction: float = bounded(0.0, ge=0.0, le=1.0)
    phases: list[PhaseConfig] = field(default_factory=lambda: [PhaseConfig()])


@dataclass
class SFTConfig:
    joint: SFTStageConfig = field(default_factory=lambda: SFTStageConfig(
        train_file="joint_sft/train.jsonl", eval_file="joint_sft/eval.jsonl"))
    long_cot: SFTStageConfig = field(default_factory=lambda: SFTStageConfig(
        train_file="long_cot/train.jsonl", eval_file="long_cot/eval.jsonl"))
    # Ray Train workers, each one DeepSpeed data-parallel rank (GPUs: cluster.use_gpu).
    num_workers: int = bounded(1, ge=1)
    cpus_per_worker: float = bounded(1.0, gt=0.0)
    zero_stage: int = bounded(2, ge=0, le=3)
    # A micro-batch is one pack of up to the phase's max_seq_len tokens; an optimizer step
    # takes num_workers * grad_accum_steps packs.
    grad_accum_steps: int = bounded(1, ge=1)
    gradient_checkpointing: bool = False
    # torch.compile each decoder layer of the language model, and each vision block where it runs
    # one FlexAttention call per block (GPU; fused elementwise kernels).
    compile_layers: bool = False
    freeze_vision: bool = False
    freeze_projector: bool = False
    overlong: Literal["truncate", "drop"] = "drop"
    weight_decay: float = bounded(0.0, ge=0.0)
    checkpoint_every: int = bounded(50, ge=1)
    # Held-out evaluation after the stage: how many examples, how many new tokens each.
    eval_examples: int = bounded(100, ge=1)
    eval_max_new_tokens: int = bounded(256, ge=1)


@dataclass
class RLConfig:
    train_file: str = "rl/train.jsonl"
    eval_file: str = "rl/eval.jsonl"
    iterations: int = bounded(20, ge=1)
    # Leave multiple-choice and true/false prompts out of RL (k1.5's prompt-set curation): a
    # guess earns their reward, so RL would reward answers its reasoning does not give
    # (rl/prompt_set.py). Evaluation still covers them.
    exclude_easy_to_hack: bool = True
    prompts_per_iteration: int = bounded(16, ge=1)
    samples_per_prompt: int = bounded(8, ge=1)
    loss: Literal["kimi_pmd", "grpo"] = "kimi_pmd"
    # The advantage estimator (rl/advantages.py); None: the loss's own (kimi_pmd: group_mean,
    # grpo: group_norm with the population std). group_norm_sample_std is TRL's, verl's and
    # OpenRLHF's GRPO normalisation.
    advantage: Optional[Literal["group_mean", "group_norm", "group_norm_sample_std"]] = None
    tau: float = bounded(0.1, gt=0.0)
    grpo_clip: float = bounded(0.2, gt=0.0)
    # GRPO's dual clip (verl's and OpenRLHF's clip_ratio_c, their default 3): a negative-advantage
    # token whose ratio exceeds it gets no gradient, which matters once samples are stale. None: off.
    grpo_dual_clip: Optional[float] = bounded(3.0, gt=1.0)
    # Truncated importance sampling (verl's tis_imp_ratio_cap): weight each token's loss (kimi_pmd:
    # each response's) by min(pi_old / pi_rollout, cap), correcting for samples the engines drew
    # with stale weights (max_staleness 1) or different numerics. None: off.
    truncated_is_cap: Optional[float] = bounded(None, ge=1.0)
    lr: float = bounded(1e-4, gt=0.0)
    # Optimizer steps over which the rate rises linearly to lr (OpenRLHF's lr_warmup_ratio, verl's
    # lr_warmup_steps): a fresh Adam's first steps move every weight by the full rate whatever
    # its gradient's size. Counted over the run, so a reset each iteration does not re-warm.
    lr_warmup_steps: int = bounded(0, ge=0)
    # Optimizer steps per iteration on the same rollouts (the first has log π = log π_old;
    # later ones are where the mirror-descent term τ holds the policy near π_old).
    updates_per_iteration: int = bounded(2, ge=1)
    # Send the learner only the groups whose rewards differ (verl's group filtering, DAPO's
    # dynamic sampling): an all-right or all-wrong group has zero advantage, so it adds learner
    # time but no policy gradient. Every group is still scored and updates the sampler. Under
    # kimi_pmd this also drops those groups' tau term from later updates of the iteration.
    drop_zero_advantage_groups: bool = True
    # Dynamic sampling (DAPO): while fewer than prompts_per_iteration groups of an iteration have
    # differing task rewards, roll out prompts_per_iteration more prompts, at most this many
    # extra times (0: off). Counted in the metrics as sampling_rounds and sampled_groups.
    dynamic_sampling_rounds: int = bounded(0, ge=0)
    # Policy versions a trained sample's oldest token may lag the learner. 0: generate, score,
    # learn, sync in turn. 1 or more: the engines collect the next iteration's groups with the
    # weights before this update while the learner trains (the learner and vLLM stop waiting
    # for each other); above 1, partial responses (rollout.token_budget) may be continued until
    # their oldest tokens are that old. Set truncated_is_cap with it: uncorrected one-iteration-old
    # samples cost the tiny recipe accuracy (docs/reference.md, Overlap).
    max_staleness: int = bounded(0, ge=0, le=8)
    reset_optimizer_each_iteration: bool = True
    # Weight of a KL penalty to the run's starting policy, per response token (the k3 estimator,
    # as verl's use_kl_loss and OpenRLHF's init_kl_coef), summed and normalised like the loss:
    # it keeps what the answer-only reward does not score (a trace's intermediate steps) near
    # the SFT model's. The learner holds a frozen copy of that model (0: off, no copy).
    kl_coef: float = bounded(0.0, ge=0.0)
    length_penalty_weight: float = bounded(0.5, ge=0.0)
    # Which prompt groups carry the length term. all: k1.5 as written; then an all-right group
    # whose lengths differ is a training group too, and such groups crowd out the ones whose
    # answers differ, which dynamic sampling collects. mixed: only groups whose answers differ.
    length_penalty_groups: Literal["all", "mixed"] = "all"
    # Subtracted from the reward of a response without a well-formed thinking section
    # (model.think_open ... think_close, then an answer): the answer-only reward never looks at
    # the reasoning, and under a length penalty dropping it is the shortest way (0: off).
    format_penalty: float = bounded(0.0, ge=0.0)
    length_penalty_start_iteration: int = bounded(10, ge=0)
    micro_batch_tokens: int = bounded(4096, ge=16)
    # Recompute each layer's activations in backward (as sft.gradient_checkpointing): what lets a
    # 3B policy's micro-batch of 16K tokens fit beside its optimizer on one GPU.
    gradient_checkpointing: bool = False
    # Adam's moments, fp32 master weights and gradients in CPU memory, the step on the CPU
    # (ZeRO-Offload; zero_stage >= 1): the GPU keeps the bf16 weights, so a 3B policy's optimizer
    # fits beside a colocated engine on one 80 GB GPU, for a slower step.
    offload_optimizer: bool = False
    zero_stage: int = bounded(2, ge=0, le=3)
    eval_every: int = bounded(5, ge=1)
    eval_prompts: int = bounded(64, ge=1)
    checkpoint_every: int = bounded(5, ge=1)


@dataclass
class RolloutConfig:
    num_workers: int = bounded(1, ge=1)
    tensor_parallel_size: int = bounded(1, ge=1)
    temperature: float = bounded(1.0, ge=0.0)
    top_p: float = bounded(1.0, gt=0.0, le=1.0)
    max_new_tokens: int = bounded(256, ge=1)
    # Partial rollouts (Kimi k1.5): tokens a response may grow by per iteration. A response not
    # finished within it keeps its tokens and log-probabilities and is continued in the next
    # iteration; its group trains once all its responses are done. Needs rl.max_staleness >= 2.
    # None: every response is generated to the end in its own iteration.
    token_budget: Optional[int] = bounded(None, ge=1)
    # What happens to a partial response whose oldest tokens would lag the learner by more than
    # rl.max_staleness: its group is sampled again from the prompt ("regenerate") or discarded.
    stale_partial: Literal["regenerate", "drop"] = "regenerate"
    # End a response whose last tokens are one n-gram (n <= 32) repeated this many times in a row,
    # checked whenever a segment ends (finish reason "repeat"); 0: off.
    stop_repeats: int = bounded(0, ge=0)
    # Tokens an engine holds per sequence, prompt and response (vLLM's max_model_len). None: the
    # prompt budget (max_prompt_text_tokens and the images) plus the longest generation the config
    # asks for (max_new_tokens, sft.eval_max_new_tokens); see kimivl_rl/rollout/limits.py.
    max_model_len: Optional[int] = bounded(None, ge=16)
    # The text part of the prompt budget: chat template, system prompt and question, in tokens.
    max_prompt_text_tokens: int = bounded(1024, ge=1)
    # Images one prompt may carry (vLLM's limit_mm_per_prompt; part of the prompt budget). "auto":
    # the most one row holds in the data files the command reads (at least 1). A number: a row
    # with more stops sft, rl, run and eval before any engine starts.
    max_images_per_prompt: Union[int, Literal["auto"]] = bounded("auto", ge=1)
    # On CPU vLLM reads this as a share of one NUMA node's memory; 0.92 fails at start.
    gpu_memory_utilization: float = bounded(0.3, gt=0.0, le=1.0)
    # Run vLLM's engine core and its one worker inside the calling process instead of two
    # spawned ones, each of which imports torch and vLLM again (under half the start time on
    # CPU: bench/README.md). None: in-process on CPU with
    # tensor_parallel_size 1; GPUs keep the separate processes, whose scheduler overlaps the model.
    in_process: Optional[bool] = None


@dataclass
class RewardConfig:
    # Reward actors (reward-0, reward-1, ...; cluster.reward_cpus each), each scoring one item at a
    # time: every batch is split into contiguous shards across them (kimivl_rl/reward/pool.py).
    num_workers: int = bounded(1, ge=1)
    # "module.path:function" of a user reward function; None uses the built-in verifier.
    function: Optional[str] = None
    timeout_s: float = bounded(5.0, gt=0.0)
    numeric_tolerance: float = bounded(1e-6, ge=0.0)


@dataclass
class SamplerConfig:
    mode: Literal["uniform", "curriculum", "prioritized", "informative"] = "prioritized"
    floor: float = bounded(0.05, ge=0.0, le=1.0)
    ema_decay: float = bounded(0.7, ge=0.0, le=1.0)
    drop_always_solved_after: int = bounded(3, ge=1)
    label_samples: int = bounded(10, ge=1)
    label_temperature: float = bounded(1.0, ge=0.0)


@dataclass
class LongCoTBuilderConfig:
    # ``kimivl-rl data build-long-cot``: rejection sampling of long-CoT SFT traces from a teacher.
    # Temperature and max_new_tokens come from the rollout section (or the command's flags).
    samples_per_prompt: int = bounded(8, ge=1)
    # Response length in tokens (thinking section included); a response cut off at
    # max_new_tokens always counts as too long.
    min_response_tokens: int = bounded(0, ge=0)
    max_response_tokens: Optional[int] = bounded(None, ge=1)
    # How many of the four behaviours (planning, evaluation, reflection, exploration) the
    # thinking section must show.
    min_behaviours: int = bounded(4, ge=0, le=4)


@dataclass
class EvalConfig:
    # The tier whose held-out accuracy the run's summary headlines RL's gain on: rows of these
    # difficulty levels and task kinds (an empty list admits any). "auto" picks the levels by a
    # rule before RL trains: those where RL's starting model has held-out greedy accuracy within
    # [tier_min_accuracy, tier_max_accuracy] at RL's iteration-0 evaluation, neither hopeless nor
    # saturated, where a group's samples disagree and group-relative RL has signal.
    tier_difficulties: Union[list[int], Literal["auto"]] = "auto"
    tier_min_accuracy: float = bounded(0.2, ge=0.0, le=1.0)   # the band of "auto", inclusive
    tier_max_accuracy: float = bounded(0.8, ge=0.0, le=1.0)
    tier_tasks: list[str] = field(default_factory=list)
    # K of mean@K and pass@K for ``kimivl-rl eval`` and the run's final evaluation (0: greedy only),
    # sampled at the rollout temperature.
    samples: int = bounded(8, ge=0)


@dataclass
class ClusterConfig:
    # None starts (or joins, inside a Ray job) a local cluster.
    address: Optional[str] = None
    num_learners: int = bounded(1, ge=1)
    use_gpu: bool = False
    learner_cpus: float = bounded(0.5, gt=0.0)
    rollout_cpus: float = bounded(0.5, gt=0.0)
    reward_cpus: float = bounded(0.25, gt=0.0)
    # Custom resources the RL actors of each role ask for, which pins roles to nodes: with
    # {"rollout_node": 1} here and `ray start --resources='{"rollout_node": 1}'` on the nodes
    # meant for rollouts, rollout workers run there and nowhere else. Empty: any node.
    learner_resources: dict[str, float] = ray_resources()
    rollout_resources: dict[str, float] = ray_resources()
    reward_resources: dict[str, float] = ray_resources()
    # torch threads per learner rank; None keeps Ray's (its CPUs, at least 1).
    learner_threads: Optional[int] = bounded(None, ge=1)
    # torch threads of an in-process vLLM engine (rollout workers, evaluation); None keeps Ray's.
    rollout_threads: Optional[int] = bounded(None, ge=1)
    # The memory allocator of rollout workers, learner ranks and evaluation (infra/allocator.py):
    # "tcmalloc" preloads it (an error where it is missing), "auto" does where it is installed,
    # "system" keeps the system's (glibc), or the path of an allocator's shared library.
    # On CPU, vLLM and the learner run faster with tcmalloc (bench/README.md).
    malloc: str = "auto"
    # Services the project starts bind here; "0.0.0.0" only when asked for.
    bind_host: str = "127.0.0.1"
    # The dashboard of a local cluster this run starts. Keep it on for SFT: it serves the state
    # API that Ray Train's placement-group cleaner polls, and without it the cleaner can take a
    # live run for dead and remove its workers (seen with Ray 2.60).
    dashboard: bool = True
    # None: 8265, or the next free port when another local cluster holds it.
    dashboard_port: Optional[int] = bounded(None, ge=1, le=65535)
    actor_max_restarts: int = bounded(2, ge=0)
    # How often a run restarts a dead learner group from its newest checkpoint (and redoes the
    # iterations since) before it stops with an error that says how to resume.
    max_learner_restarts: int = bounded(2, ge=0)
    # The rollout engine shares learner rank 0's device (one GPU, or one node on CPU): the two
    # are placed together, and on a GPU the engine sleeps while the learner steps (vLLM's sleep
    # level 2 frees its KV cache and weights; the next sync wakes it). One learner rank, one
    # rollout worker, tensor_parallel_size 1, rl.max_staleness 0.
    colocate: bool = False
    # How the learners' weights reach the rollout engines after each update (infra/weight_sync.py):
    # "object_store": rank 0's weights through Ray's object store (the CPU choice);
    # "collective": broadcast from learner rank 0 to every vLLM worker over a process group of
    # their own, NCCL on GPU (the GPU choice) and gloo on CPU;
    # "ipc" (needs colocate): a ring of buffers the two share, CUDA IPC on a GPU (device-to-device
    # copies) and shared memory on CPU (infra/ipc_weight_sync.py; the colocated GPU choice).
    weight_transport: Literal["object_store", "collective", "ipc"] = "object_store"
    # "collective" and "ipc": the most bytes one bucket carries (a larger tensor goes alone). Each
    # side holds about one bucket beside the model while a sync runs (the ring: two).
    weight_bucket_bytes: int = bounded(512 * 2**20, ge=1)
    call_timeout_s: float = bounded(600.0, gt=0.0)


@dataclass
class OutputConfig:
    dir: str = "runs/tiny/out"
    keep_last_checkpoints: int = bounded(2, ge=1)
    tensorboard: bool = True
    # The console shows progress bars, each stage's results and warnings; verbose (`--verbose`)
    # adds each RL iteration's metrics, each SFT log step, and Ray Train's and vLLM's INFO lines.
    # metrics.jsonl, TensorBoard and Ray's dashboard get every metric either way.
    verbose: bool = False


@dataclass
class Config:
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    long_cot_builder: LongCoTBuilderConfig = field(default_factory=LongCoTBuilderConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

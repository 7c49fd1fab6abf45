"""Load a policy (model + processor) the same way everywhere: local path or hub name, remote
code only when the config asks, the fastest exact attention available."""
from __future__ import annotations

import importlib.util
import logging

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

log = logging.getLogger(__name__)


def attention_implementation(use_gpu: bool) -> str:
    """flash-attn's variable-length kernels when installed on a GPU; else FlexAttention on a
    GPU (a block-diagonal mask that skips the blocks between packed examples: 54% MFU against
    35% for SDPA with a dense mask, bench/learner_gpu.py on an H200); else torch SDPA. Given
    packed position ids, each keeps packed examples apart."""
    if use_gpu and torch.cuda.is_available():
        return "flash_attention_2" if importlib.util.find_spec("flash_attn") else "flex_attention"
    return "sdpa"


def load_policy(path: str, cfg, training: bool = False):
    """(model, processor) for ``path``; bf16 on GPU, fp32 on CPU unless model.dtype says."""
    use_gpu = cfg.cluster.use_gpu
    dtype = {"auto": torch.bfloat16 if use_gpu else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.model.dtype]
    attention = attention_implementation(use_gpu)
    load = lambda attn: AutoModelForImageTextToText.from_pretrained(  # noqa: E731
        path, dtype=dtype, attn_implementation=attn, trust_remote_code=cfg.model.trust_remote_code)
    try:
        model = load(attention)
    except ValueError as exc:  # an architecture without that attention kernel
        if attention == "sdpa":
            raise
        log.warning("%s: %s unavailable (%s); using sdpa", path, attention, exc)
        attention = "sdpa"
        model = load(attention)
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    model.train(training)
    log.info("loaded %s (%s, attention %s)", path, dtype, attention)
    return model, processor

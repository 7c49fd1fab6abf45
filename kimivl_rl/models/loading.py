"""Load a policy (model + processor) the same way everywhere: local path or hub name, remote
code only when the config asks, the fastest exact attention available."""
from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from kimivl_rl.config import ConfigError
from kimivl_rl.infra.layout import CheckpointFiles
from kimivl_rl.models.packed_attention import PACKED_SDPA
from kimivl_rl.models.families import family_of, inner_model, register_local_classes

log = logging.getLogger(__name__)


def check_remote_code(path: str, trust_remote_code: bool) -> None:
    """Refuse a local model directory whose config needs custom code (an ``auto_map`` for a
    model type transformers does not know) unless ``model.trust_remote_code`` is set: a
    ``ConfigError`` names the code files and the setting. Nothing in the directory is run."""
    config_file = Path(path) / "config.json"
    if trust_remote_code or not config_file.is_file():
        return  # allowed, or a hub name (transformers itself refuses custom code there)
    try:
        auto_map = json.loads(config_file.read_text(encoding="utf-8")).get("auto_map")
    except (OSError, ValueError, AttributeError):
        return  # unreadable or not a JSON object: the loader reports that, in context
    if not auto_map or not isinstance(auto_map, dict):
        return
    from transformers import AutoConfig

    register_local_classes(path)   # a family of ours (Kimi-VL) needs none of the directory's code
    try:
        AutoConfig.from_pretrained(path, trust_remote_code=False)  # runs nothing when refusing
    except ValueError as exc:
        if "trust_remote_code" not in str(exc):
            return  # some other problem: the loader reports it, in context
        targets = [t for v in auto_map.values() for t in (v if isinstance(v, list) else [v])
                   if isinstance(t, str)]
        files = sorted({t.rpartition(".")[0].split("--")[-1] + ".py" for t in targets})
        raise ConfigError(f"{path}: the model needs custom code from its directory "
                          f"({', '.join(files) or 'auto_map'}) and model.trust_remote_code is false; "
                          f"read that code, and set model.trust_remote_code=true only if you "
                          f"trust it") from None


def attention_implementation(use_gpu: bool, training: bool = False) -> str:
    """flash-attn's variable-length kernels when installed on a GPU; else FlexAttention on a
    GPU (a block-diagonal mask that skips the blocks between packed examples, far faster than
    SDPA with a dense mask: bench/README.md); else, for training on
    CPU, torch SDPA on each packed example (``packed_attention``); else torch SDPA. Given packed
    position ids, each keeps packed examples apart."""
    if use_gpu and torch.cuda.is_available():
        return "flash_attention_2" if importlib.util.find_spec("flash_attn") else "flex_attention"
    return PACKED_SDPA if training else "sdpa"


def language_model(model):
    """The decoder stack of a VLM (or of a plain causal LM), also through a DeepSpeed wrapper."""
    core = inner_model(model)
    return getattr(core, "language_model", core)


def is_vision_language_model(model) -> bool:
    """A VLM (a language model beside a vision side) has a model family; a plain causal LM none."""
    return hasattr(inner_model(model), "language_model")


def use_language_model_attention(model, attention: str) -> None:
    """Run the language model with ``attention``, the vision encoder keeping its own.
    transformers 5 declares no FlexAttention for Qwen2.5-VL, yet its language model runs it:
    the same logits as SDPA (checked on CPU), and bench/learner_gpu.py --shape vlm trains with it
    on one H200."""
    language_model(model).config._attn_implementation = attention


def compile_decoder_layers(model) -> None:
    """Regional compilation: each decoder layer of the language model compiled on its own, so
    RMSNorm, SwiGLU and RoPE run as fused kernels (bench/README.md, learner_gpu.py) while
    compile time stays that of one layer; so is each vision block of a VLM where its family
    allows (``ModelFamily.compile_vision_blocks``). A plain causal LM has no family to ask."""
    for layer in language_model(model).layers:
        layer.compile()
    if is_vision_language_model(model):
        family_of(model).compile_vision_blocks()


def load_policy(path: str, cfg, training: bool = False):
    """(model, processor) for ``path``; bf16 on GPU, fp32 on CPU unless model.dtype says."""
    register_local_classes(path)
    check_remote_code(path, cfg.model.trust_remote_code)
    use_gpu = cfg.cluster.use_gpu
    dtype = {"auto": torch.bfloat16 if use_gpu else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.model.dtype]
    attention = attention_implementation(use_gpu, training)
    load = lambda attn: AutoModelForImageTextToText.from_pretrained(  # noqa: E731
        path, dtype=dtype, attn_implementation=attn, trust_remote_code=cfg.model.trust_remote_code)
    model, attention = _load_with_attention(load, path, attention)
    attention = _vision_attention(model, attention)
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    model.train(training)
    log.info("loaded %s (%s, attention %s)", path, dtype, attention)
    return model, processor


def _load_with_attention(load, path: str, attention: str):
    """(model, what runs where) for ``load(attention)``. ``packed_sdpa`` runs in the language
    model only, and so does FlexAttention for a VLM whose architecture does not declare it; the
    vision encoder then keeps SDPA. Another undeclared kernel falls back to SDPA."""
    if attention == PACKED_SDPA:
        return _in_language_model(load("sdpa"), attention)
    try:
        return load(attention), attention
    except ValueError as exc:
        if attention == "sdpa":
            raise
        model = load("sdpa")
        if attention == "flex_attention" and is_vision_language_model(model):
            return _in_language_model(model, attention)
        log.warning("%s: %s unavailable (%s); using sdpa", path, attention, exc)
        return model, "sdpa"


def _in_language_model(model, attention: str):
    use_language_model_attention(model, attention)
    return model, f"{attention} in the language model, sdpa in the vision encoder"


def _vision_attention(model, attention: str) -> str:
    """With FlexAttention (a GPU without flash-attn), a vision encoder that loops over windows
    or images (Qwen2.5-VL's) runs each block's attention as one FlexAttention call instead
    (``ModelFamily.use_fused_vision_attention``: same outputs; the 3B learner's tokens/s in
    bench/README.md). flash-attn's vision path is variable-length already; on CPU the loop
    stays (its windows are few and small there)."""
    if not attention.startswith("flex_attention") or not family_of(model).use_fused_vision_attention():
        return attention
    return f"{attention.split(',')[0]}; the vision encoder one FlexAttention call per block"


def is_rl_checkpoint(path: str | Path) -> bool:
    """An RL checkpoint directory (``rl/checkpoints/iter_N``), not a Hugging Face model."""
    files = CheckpointFiles(Path(path))
    return files.controller_state.is_file() and Path(f"{files.weights}.json").is_file()


def export_rl_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """An RL checkpoint's learner weights as a Hugging Face model directory, with the config and
    processor of the model its run started from (recorded in the checkpoint)."""
    from kimivl_rl.infra.checkpoint import load_state

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    files = CheckpointFiles(checkpoint)
    base = json.loads(files.controller_state.read_text()).get("input_model")
    if not base:
        raise ConfigError(f"{checkpoint}: this checkpoint does not record the model its run "
                          f"started from (written by an older kimivl-rl); use the run's rl/model")
    register_local_classes(base)
    model = AutoModelForImageTextToText.from_pretrained(base)
    model.load_state_dict(load_state(files.weights))
    model.save_pretrained(out_dir)
    family_of(model).finish_checkpoint(out_dir)
    AutoProcessor.from_pretrained(base).save_pretrained(out_dir)
    return out_dir


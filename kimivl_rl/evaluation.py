"""Held-out evaluation by generation: is the final answer right, and does the output follow the
long-CoT trace format? Used after each SFT stage and periodically during RL."""
from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

from kimivl_rl.data.rows import Example
from kimivl_rl.data.traces import BEHAVIOUR_MARKERS, trace_behaviours
from kimivl_rl.reward.contract import RewardInput, answer_only_reward
from kimivl_rl.reward.extract import split_thinking
from kimivl_rl.rollout.vllm_engine import GenerationRequest, Sample


@dataclass
class EvalResult:
    examples: int
    accuracy: float
    mean_response_tokens: float
    trace_format_rate: float  # closed thinking section showing all four behaviours
    accuracy_by_difficulty: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def prompt_messages(example: Example) -> list[dict]:
    """The conversation up to (not including) the final assistant answer."""
    messages = list(example.messages)
    while messages and messages[-1]["role"] == "assistant":
        messages.pop()
    return messages


def generation_requests(examples: list[Example], processor) -> list[GenerationRequest]:
    return [GenerationRequest(
        prompt=processor.apply_chat_template(prompt_messages(ex), tokenize=False,
                                             add_generation_prompt=True),
        images=ex.images, request_id=ex.source) for ex in examples]


def shows_trace_format(text: str, think_open: str, think_close: str) -> bool:
    reasoning, _ = split_thinking(text, think_open, think_close)
    return reasoning is not None and trace_behaviours(reasoning) == set(BEHAVIOUR_MARKERS)


def answer_scores(examples: list[Example], samples: list[Sample], think_open: str,
                  think_close: str) -> list[float]:
    return [answer_only_reward(RewardInput(response=s.text, reference=ex.answer,
                                           think_open=think_open, think_close=think_close)).score
            for ex, s in zip(examples, samples)]


def score_samples(examples: list[Example], samples: list[Sample], think_open: str,
                  think_close: str) -> EvalResult:
    correct = answer_scores(examples, samples, think_open, think_close)
    traces = [shows_trace_format(s.text, think_open, think_close) for s in samples]
    n = max(1, len(samples))
    by_level = defaultdict(list)
    for ex, c in zip(examples, correct):
        by_level[str(int(ex.difficulty)) if ex.difficulty is not None else "unlabelled"].append(c)
    return EvalResult(examples=len(samples), accuracy=sum(correct) / n,
                      mean_response_tokens=sum(len(s.token_ids) for s in samples) / n,
                      trace_format_rate=sum(traces) / n,
                      accuracy_by_difficulty={k: sum(v) / len(v) for k, v in sorted(by_level.items())})


def greedy_samples(engine, examples: list[Example], processor, max_new_tokens: int) -> list[Sample]:
    outputs = engine.generate(generation_requests(examples, processor), n=1, temperature=0.0,
                              max_new_tokens=max_new_tokens)
    return [o[0] for o in outputs]


def evaluate(engine, examples: list[Example], processor, *, think_open: str, think_close: str,
             max_new_tokens: int) -> EvalResult:
    """Greedy answers to every example, scored by the answer-only reward."""
    samples = greedy_samples(engine, examples, processor, max_new_tokens)
    return score_samples(examples, samples, think_open, think_close)


@contextmanager
def greedy_engine(cfg, model_dir: str):
    """A vLLM engine and processor for ``model_dir`` with the config's settings, shut down after."""
    from transformers import AutoProcessor

    from kimivl_rl.rollout.vllm_engine import VLLMEngine, engine_options

    engine = VLLMEngine(engine_options(cfg, model_dir))
    try:
        yield engine, AutoProcessor.from_pretrained(
            model_dir, trust_remote_code=cfg.model.trust_remote_code)
    finally:
        engine.shutdown()


def on_rollout_resources(cfg, task, *args, step: str):
    """Run ``task(config_dict, *args)`` as a Ray task with a rollout worker's resources (on a GPU
    cluster the driver's node may have no GPU) and wait for it under the call timeout."""
    import ray

    from kimivl_rl.config import config_to_dict
    from kimivl_rl.remote import wait_one

    gpus = cfg.rollout.tensor_parallel_size if cfg.cluster.use_gpu else 0
    remote = ray.remote(task).options(num_cpus=cfg.cluster.rollout_cpus, num_gpus=gpus)
    return wait_one(remote.remote(config_to_dict(cfg), *args), "evaluation", step,
                    cfg.cluster.call_timeout_s)

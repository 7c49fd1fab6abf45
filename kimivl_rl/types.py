"""What a rollout engine takes and gives: ``GenerationRequest`` in, ``Sample`` out (token ids
and log-probabilities). Here, away from ``rollout/vllm_engine.py``, so the RL maths and the data
jobs speak them without importing torch or vLLM.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:  # annotations only: a request's images are PIL images
    from PIL import Image


@dataclass
class GenerationRequest:
    prompt: str                      # rendered chat prompt, generation header included
    images: list[Image.Image] = field(default_factory=list)
    request_id: str = ""
    # A partial response to continue: the tokens sampled so far follow the prompt, and the
    # samples hold only the new tokens (partial rollouts).
    continuation: list[int] = field(default_factory=list)
    max_new_tokens: Optional[int] = None  # this request's limit; None: the call's
    n: Optional[int] = None               # this request's number of samples; None: the call's


@dataclass
class Sample:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]            # log p of each sampled token under the sampling policy
    finish_reason: str               # "stop" or "length"
    text: str

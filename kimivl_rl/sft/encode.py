"""Turn one chat example into model inputs with loss only on the assistant's answers.

Which tokens carry loss is decided on the rendered text, not by token patterns, so it works for
any chat template: for each assistant turn i, the trainable span runs from the end of
``render(messages[:i], add_generation_prompt=True)`` (the assistant header) to the end of
``render(messages[:i+1])`` minus trailing whitespace, which is the answer, its thinking section
and the special tokens that close the turn. System, user and image-placeholder tokens are
outside every span.
"""
from __future__ import annotations

from typing import Optional

import torch

from kimivl_rl.data.rows import Example
from kimivl_rl.training.packing import IGNORE_INDEX, Encoded


def _render(processor, messages: list[dict], generation_prompt: bool = False) -> str:
    return processor.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def renders_reasoning(processor) -> bool:
    """Whether the chat template writes an assistant's ``reasoning_content`` (the tiny models'
    does; Qwen2.5-VL's and Kimi-VL's published ones drop it)."""
    probe = [{"role": "user", "content": "q"},
             {"role": "assistant", "reasoning_content": "kimivl-rl reasoning probe", "content": "a"}]
    return "kimivl-rl reasoning probe" in _render(processor, probe)


def with_reasoning_in_content(messages: list[dict], think: tuple[str, str]) -> list[dict]:
    """Each assistant turn's ``reasoning_content`` written at the start of its content between
    the ``think`` markers, as a thinking model's own output holds it."""
    def folded(message: dict) -> dict:
        reasoning = message.get("reasoning_content")
        if message["role"] != "assistant" or not reasoning:
            return message
        content = message["content"]
        opening = f"{think[0]}{reasoning}{think[1]}"
        rest = {k: v for k, v in message.items() if k != "reasoning_content"}
        return {**rest, "content": opening + content if isinstance(content, str)
                else [{"type": "text", "text": opening}, *content]}
    return [folded(m) for m in messages]


def answer_char_spans(processor, messages: list[dict]) -> list[tuple[int, int]]:
    """Character spans (in the unexpanded rendered text) of every assistant answer."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_render(processor, messages[:i], generation_prompt=True))
        end = len(_render(processor, messages[: i + 1]).rstrip())
        spans.append((start, end))
    return spans


def _expand_image_tokens(text: str, image_token: str, counts: list[int]) -> tuple[str, list[tuple[int, int]]]:
    """Replace the n-th image token by counts[n] copies; return the text and the
    (position, added characters) of each expansion, to shift spans that follow it."""
    pieces, shifts, cursor = [], [], 0
    for count in counts:
        at = text.index(image_token, cursor)
        pieces.append(text[cursor:at] + image_token * count)
        shifts.append((at, len(image_token) * (count - 1)))
        cursor = at + len(image_token)
    pieces.append(text[cursor:])
    return "".join(pieces), shifts


def _shift(position: int, shifts: list[tuple[int, int]]) -> int:
    return position + sum(added for at, added in shifts if at < position)


def encode_example(example: Example, processor, family,
                   fold_reasoning: Optional[tuple[str, str]] = None) -> Encoded:
    """Tokenize an example, label its answers and compute its (restarting) positions, for the
    model ``family`` is bound to (``family_of``). ``fold_reasoning``: the thinking markers to
    write ``reasoning_content`` between, in the content, for a template that drops it
    (``renders_reasoning``), so no trace is lost to it."""
    messages = example.messages
    if fold_reasoning is not None:
        messages = with_reasoning_in_content(messages, fold_reasoning)
    text = _render(processor, messages)
    spans = answer_char_spans(processor, messages)
    pixel_values = grid = None
    counts: list[int] = []
    if example.images:
        pixel_values, grid = family.encode_images(processor, example.images)
        counts = family.vision_token_counts(processor, grid)
    text, shifts = _expand_image_tokens(text, family.image_token(processor), counts)
    spans = [(_shift(s, shifts), _shift(e, shifts)) for s, e in spans]
    tokens = processor.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = torch.tensor(tokens["input_ids"])
    starts = torch.tensor([s for s, _ in tokens["offset_mapping"]])
    in_answer = torch.zeros_like(input_ids, dtype=torch.bool)
    for s, e in spans:
        in_answer |= (starts >= s) & (starts < e)
    labels = torch.where(in_answer, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return Encoded(input_ids, labels, pixel_values, grid,
                   family.positions(input_ids, grid), example.source)

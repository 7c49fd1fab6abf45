"""Turn one chat example into model inputs with loss only on the assistant's answers.

Which tokens carry loss is decided on the rendered text, not by token patterns, so it works for
any chat template: for each assistant turn i, the trainable span runs from the end of
``render(messages[:i], add_generation_prompt=True)`` (the assistant header) to the end of
``render(messages[:i+1])`` minus trailing whitespace, which is the answer, its thinking section
and the special tokens that close the turn. System, user and image-placeholder tokens are
outside every span.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from kimivl_rl.data.rows import Example

IGNORE_INDEX = -100


@dataclass
class Encoded:
    """One example, ready to pack: token ids, labels, its images and its own positions."""

    input_ids: torch.Tensor          # (L,)
    labels: torch.Tensor             # (L,), IGNORE_INDEX outside answers
    pixel_values: Optional[torch.Tensor]   # (patches, dim) or None
    image_grid_thw: Optional[torch.Tensor]  # (images, 3) or None
    position_ids: torch.Tensor       # (4, L): text positions, then the 3 mrope rows
    source: str

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_label_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


def _render(processor, messages: list[dict], generation_prompt: bool = False) -> str:
    return processor.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=generation_prompt)


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


def encode_example(example: Example, processor, model) -> Encoded:
    """Tokenize an example, label its answers and compute its (restarting) positions."""
    text = _render(processor, example.messages)
    spans = answer_char_spans(processor, example.messages)
    pixel_values = grid = None
    counts: list[int] = []
    if example.images:
        vision = processor.image_processor(images=example.images, return_tensors="pt")
        pixel_values, grid = vision["pixel_values"], vision["image_grid_thw"]
        merge = processor.image_processor.merge_size ** 2
        counts = [int(g.prod()) // merge for g in grid]
    text, shifts = _expand_image_tokens(text, processor.image_token, counts)
    spans = [(_shift(s, shifts), _shift(e, shifts)) for s, e in spans]
    tokens = processor.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = torch.tensor(tokens["input_ids"])
    starts = torch.tensor([s for s, _ in tokens["offset_mapping"]])
    in_answer = torch.zeros_like(input_ids, dtype=torch.bool)
    for s, e in spans:
        in_answer |= (starts >= s) & (starts < e)
    labels = torch.where(in_answer, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return Encoded(input_ids, labels, pixel_values, grid,
                   example_positions(model, input_ids, grid), example.source)


def example_positions(model, input_ids: torch.Tensor, image_grid_thw: Optional[torch.Tensor]) -> torch.Tensor:
    """(4, L) positions of one example from 0: text positions, then Qwen2.5-VL's 3 mrope rows.

    Packed examples each start from 0, which is also how the model tells them apart: a
    restart in the text row makes its attention block-diagonal.
    """
    length = input_ids.shape[0]
    text = torch.arange(length)
    if image_grid_thw is None:
        return text.expand(4, length).clone()
    mm_types = (input_ids == model.config.image_token_id).int()[None]
    with torch.no_grad():
        rope, _ = inner_model(model).get_rope_index(input_ids[None], mm_token_type_ids=mm_types,
                                                    image_grid_thw=image_grid_thw)
    return torch.cat([text[None], rope[:, 0]], dim=0)


def inner_model(model):
    """The Qwen2.5-VL base model (``model.model``), also through a DeepSpeed wrapper."""
    model = getattr(model, "module", model)
    return model.model

"""Sequences and packing, shared by SFT and the RL learner.

``Encoded`` is one sequence with its labels, images and own positions. A pack is a list of
sequences whose lengths sum to at most a maximum length.

A pack is a list of examples whose lengths sum to at most the phase's maximum length. Packs are
concatenated into one row (batch size 1, no padding); each example keeps its own positions
starting from 0, which is what makes the model's attention block-diagonal (the model derives
the packed mask from restarts of the text position row), and keeps its own images.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

IGNORE_INDEX = -100

@dataclass
class Encoded:
    """One example, ready to pack: token ids, labels, its images and its own positions."""

    input_ids: torch.Tensor          # (L,)
    labels: torch.Tensor             # (L,), IGNORE_INDEX outside answers
    pixel_values: Optional[torch.Tensor]   # (patches, dim) or None
    image_grid_thw: Optional[torch.Tensor]  # (images, 3) or None
    position_ids: torch.Tensor       # (rows, L): text positions, then any the family adds
    source: str

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_label_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


MAX_OPEN_BINS = 64  # first-fit over this many open packs keeps planning linear in the data


def plan_packs(lengths: list[int], max_len: int, seed: int) -> list[list[int]]:
    """Shuffle example indices with ``seed`` and first-fit them into packs of <= max_len."""
    order = np.random.default_rng(seed).permutation(len(lengths))
    packs: list[list[int]] = []
    room: list[int] = []
    first_open = 0
    for index in order.tolist():
        length = lengths[index]
        for b in range(first_open, len(packs)):
            if room[b] >= length:
                packs[b].append(index)
                room[b] -= length
                break
        else:
            packs.append([index])
            room.append(max_len - length)
        first_open = max(first_open, len(packs) - MAX_OPEN_BINS)
    return packs


@dataclass
class FitReport:
    kept: list[int]
    truncated: int
    dropped: int


def fit_to_length(examples: list[Encoded], max_len: int, overlong: str,
                  image_token_id: int) -> FitReport:
    """Indices of examples usable at ``max_len``; overlong ones are truncated or dropped.

    Truncation keeps an example only if its cut falls after its last image token (an image's
    tokens must stay whole) and at least one answer token survives; otherwise it is dropped.
    """
    kept, truncated, dropped = [], 0, 0
    for i, ex in enumerate(examples):
        if len(ex) <= max_len:
            kept.append(i)
            continue
        if overlong == "truncate" and _can_truncate(ex, max_len, image_token_id):
            examples[i] = truncate(ex, max_len)
            kept.append(i)
            truncated += 1
        else:
            dropped += 1
    return FitReport(kept, truncated, dropped)


def _can_truncate(ex: Encoded, max_len: int, image_token_id: int) -> bool:
    image_at = (ex.input_ids == image_token_id).nonzero()
    last_image = int(image_at.max()) if len(image_at) else -1
    return last_image < max_len and bool((ex.labels[1:max_len] != IGNORE_INDEX).any())


def truncate(ex: Encoded, max_len: int) -> Encoded:
    return Encoded(ex.input_ids[:max_len], ex.labels[:max_len], ex.pixel_values, ex.image_grid_thw,
                   ex.position_ids[:, :max_len], ex.source)


def collate_pack(examples: list[Encoded], family) -> dict[str, torch.Tensor]:
    """Model inputs for one pack (batch of 1) of a model of ``family`` (a bound
    ``ModelFamily``), plus ``labels`` aligned with ``input_ids``."""
    input_ids = torch.cat([e.input_ids for e in examples])[None]
    labels = torch.cat([_no_label_on_first(e.labels) for e in examples])[None]
    positions = torch.cat([e.position_ids for e in examples], dim=1)
    batch = {"input_ids": input_ids, "labels": labels, **family.batch_inputs(input_ids, positions)}
    return {**batch, **_image_inputs([e for e in examples if e.pixel_values is not None])}


def _image_inputs(examples: list[Encoded]) -> dict[str, torch.Tensor]:
    """``pixel_values`` and ``image_grid_thw`` of the pack's images in order. Examples that hold
    the very same image tensor (the k responses to one RL prompt) share it: it is packed once,
    and ``image_sources`` gives, for every image in order, its row of ``image_grid_thw``, so that
    the vision encoder runs once per distinct image (``kimivl_rl.training.linear_cross_entropy``)."""
    if not examples:
        return {}
    first_image: dict[int, int] = {}  # id(pixel_values) -> where its images start among those packed
    packed, sources, images = [], [], 0
    for e in examples:
        if id(e.pixel_values) not in first_image:
            first_image[id(e.pixel_values)] = images
            packed.append(e)
            images += len(e.image_grid_thw)
        start = first_image[id(e.pixel_values)]
        sources += range(start, start + len(e.image_grid_thw))
    inputs = {"pixel_values": torch.cat([e.pixel_values for e in packed]),
              "image_grid_thw": torch.cat([e.image_grid_thw for e in packed])}
    if len(packed) < len(examples):
        inputs["image_sources"] = torch.tensor(sources)
    return inputs


def _no_label_on_first(labels: torch.Tensor) -> torch.Tensor:
    """The first token of an example is never a target: the token before it belongs to
    another example (in a pack) or to nothing."""
    labels = labels.clone()
    labels[0] = IGNORE_INDEX
    return labels

"""Verifiable reasoning tasks with a difficulty knob, rendered deterministically from a seed.

Three kinds, each with difficulty 1 (learnable by the tiny model in minutes) to 5 (hard):

- ``count``: how many squares of one colour. Easy: 1-2 red squares on the 28-pixel grid of
  merged vision tokens. Hard: up to 9 small squares placed off-grid among distractors.
- ``colour``: the colour of a single square (easy), then which colour is most frequent as
  a multiple-choice question (hard: close counts, small off-grid squares).
- ``arith``: sums of two or three one-digit numbers (text), then how many squares there are in
  all (two colours on the grid, then three or four off it).

An image task keeps its squares, from which the long chain-of-thought traces write down each
colour's count.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (235, 200, 20)}
GRID = 28  # pixels per merged vision token of Qwen2.5-VL (14-pixel patches, 2x2 merge)
MAX_DIFFICULTY = 5
TASK_KINDS = ("count", "colour", "arith")


@dataclass
class Square:
    colour: str
    x: int
    y: int
    size: int


@dataclass
class Task:
    kind: str
    difficulty: int
    question: str
    answer: str
    image: Optional[Image.Image] = None
    squares: list[Square] = field(default_factory=list)
    choices: dict[str, str] = field(default_factory=dict)  # letter -> colour

    @property
    def final_answer(self) -> str:
        """The short answer an assistant gives; the reward reads the last \\boxed{}."""
        return f"\\boxed{{{self.answer}}}"


# ----------------------------------------------------------------------------- images

def _place_squares(rng: np.random.Generator, colours: list[str], image_size: int,
                   on_grid: bool, size_range: tuple[int, int]) -> list[Square]:
    """Place non-overlapping squares, on the grid's cells or anywhere."""
    squares: list[Square] = []
    cells = (image_size // GRID) ** 2
    if on_grid:
        slots = rng.permutation(cells)[: len(colours)]
        size = size_range[1]
        for colour, slot in zip(colours, slots):
            row, col = divmod(int(slot), image_size // GRID)
            offset = (GRID - size) // 2
            squares.append(Square(colour, col * GRID + offset, row * GRID + offset, size))
        return squares
    for colour in colours:
        for _ in range(200):  # rejection sampling; the densest setting fits easily
            size = int(rng.integers(size_range[0], size_range[1] + 1))
            x, y = (int(v) for v in rng.integers(1, image_size - size - 1, size=2))
            if all(x + size + 2 <= s.x or s.x + s.size + 2 <= x or y + size + 2 <= s.y
                   or s.y + s.size + 2 <= y for s in squares):
                squares.append(Square(colour, x, y, size))
                break
    return squares


def render(squares: list[Square], image_size: int) -> Image.Image:
    image = Image.new("RGB", (image_size, image_size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for s in squares:
        draw.rectangle([s.x, s.y, s.x + s.size - 1, s.y + s.size - 1], fill=COLOURS[s.colour])
    return image


def _layout(difficulty: int) -> tuple[bool, tuple[int, int]]:
    """(on_grid, square size range) for a difficulty."""
    if difficulty <= 3:
        return True, (20, 20)
    return False, ((14, 18) if difficulty == 4 else (12, 16))


# ----------------------------------------------------------------------------- task kinds

def make_count(rng: np.random.Generator, difficulty: int, image_size: int) -> Task:
    max_count = {1: 2, 2: 4, 3: 4, 4: 6, 5: 9}[difficulty]
    target = "red" if difficulty <= 2 else str(rng.choice(list(COLOURS)))
    count = int(rng.integers(1, max_count + 1))
    others = [c for c in COLOURS if c != target]
    n_distractors = 0 if difficulty <= 2 else int(rng.integers(1, 2 * difficulty - 2))
    colours = [target] * count + [str(rng.choice(others)) for _ in range(n_distractors)]
    on_grid, sizes = _layout(difficulty)
    colours = colours[: (image_size // GRID) ** 2] if on_grid else colours
    squares = _place_squares(rng, colours, image_size, on_grid, sizes)
    count = sum(s.colour == target for s in squares)
    return Task("count", difficulty, f"How many {target} squares are in the image?", str(count),
                render(squares, image_size), squares)


def make_colour(rng: np.random.Generator, difficulty: int, image_size: int) -> Task:
    on_grid, sizes = _layout(difficulty)
    if difficulty <= 2:
        colour = str(rng.choice(list(COLOURS)))
        squares = _place_squares(rng, [colour], image_size, difficulty == 1, sizes)
        return Task("colour", difficulty, "What colour is the square?", colour,
                    render(squares, image_size), squares)
    names = [str(c) for c in rng.permutation(list(COLOURS))]
    top = int(rng.integers(3, 5)) if difficulty < 5 else int(rng.integers(3, 6))
    gap = {3: 2, 4: 2, 5: 1}[difficulty]
    counts = {names[0]: top}
    for name in names[1:3]:
        counts[name] = int(rng.integers(1, top - gap + 1))
    colours = [c for c, n in counts.items() for _ in range(n)]
    squares = _place_squares(rng, colours, image_size, on_grid, sizes)
    seen = {c: sum(s.colour == c for s in squares) for c in counts}
    winner = max(seen, key=lambda c: (seen[c], c == names[0]))
    choices = dict(zip("ABCD", sorted(COLOURS)))
    letter = next(k for k, v in choices.items() if v == winner)
    options = " ".join(f"({k}) {v}" for k, v in choices.items())
    return Task("colour", difficulty, f"Which colour appears most often? {options}", letter,
                render(squares, image_size), squares, choices=choices)


def _digit_sum(rng: np.random.Generator, terms: int) -> tuple[str, int]:
    digits = [int(d) for d in rng.integers(1, 10, size=terms)]
    return " + ".join(map(str, digits)), sum(digits)


def make_arith(rng: np.random.Generator, difficulty: int, image_size: int) -> Task:
    """Sums of one-digit numbers (difficulty 1-2), then how many squares there are in all (3-5:
    two colours on the grid, then three off it, then three or four small ones): each colour's
    count reads the image, as the count task does; their total is a sum of numbers just
    written."""
    if difficulty <= 2:
        expression, value = _digit_sum(rng, difficulty + 1)
        return Task("arith", difficulty, f"What is {expression}?", str(value))
    n_colours = {3: 2, 4: 3, 5: int(rng.integers(3, 5))}[difficulty]
    names = [str(c) for c in rng.permutation(list(COLOURS))[:n_colours]]
    colours = [c for c in names for _ in range(int(rng.integers(1, 4)))]
    on_grid, sizes = _layout(difficulty)
    squares = _place_squares(rng, colours, image_size, on_grid, sizes)
    return Task("arith", difficulty, "How many squares are there in all?", str(len(squares)),
                render(squares, image_size), squares)


MAKERS: dict[str, Callable[[np.random.Generator, int, int], Task]] = {
    "count": make_count, "colour": make_colour, "arith": make_arith}


def make_task(kind: str, rng: np.random.Generator, difficulty: int, image_size: int) -> Task:
    if not 1 <= difficulty <= MAX_DIFFICULTY:
        raise ValueError(f"difficulty must be in 1..{MAX_DIFFICULTY}, got {difficulty}")
    return MAKERS[kind](rng, difficulty, image_size)

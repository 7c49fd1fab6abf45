"""The built-in data: deterministic from the seed, well-formed, verifiable, graded by difficulty."""
from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kimivl_rl.data.build import BuildSpec, build_dataset, dataset_is_current, sample_task
from kimivl_rl.data.rows import RowLoader
from kimivl_rl.data.tasks import COLOURS, make_task
from kimivl_rl.data.traces import BEHAVIOUR_MARKERS, long_cot_reasoning, trace_behaviours

from conftest import SMALL_DATA

SPLITS = ("joint_sft", "long_cot", "rl")


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_files(tmp_path, small_data_dir):
    again = build_dataset(SMALL_DATA, tmp_path / "again", progress=False)
    assert tree_digest(again) == tree_digest(small_data_dir)


def test_other_seed_gives_other_data(tmp_path, small_data_dir):
    other = build_dataset(BuildSpec(**{**SMALL_DATA.__dict__, "seed": 1}), tmp_path / "other",
                          progress=False)
    a = (small_data_dir / "rl" / "train.jsonl").read_text()
    assert (other / "rl" / "train.jsonl").read_text() != a


def test_manifest_lists_every_file_with_its_checksum(small_data_dir):
    manifest = json.loads((small_data_dir / "manifest.json").read_text())
    on_disk = tree_digest(small_data_dir)
    on_disk.pop("manifest.json")
    assert manifest["files"] == on_disk
    assert dataset_is_current(SMALL_DATA, small_data_dir)
    assert not dataset_is_current(BuildSpec(seed=5), small_data_dir)


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("part", ["train", "eval"])
def test_every_split_loads_with_the_strict_loader(small_data_dir, split, part):
    rows = RowLoader(small_data_dir / split / f"{part}.jsonl", require_answer=True).load_all()
    expected = SMALL_DATA.eval_examples if part == "eval" else {
        "joint_sft": SMALL_DATA.joint_sft_examples, "long_cot": SMALL_DATA.long_cot_examples,
        "rl": SMALL_DATA.rl_prompts}[split]
    assert len(rows) == expected
    roles = {tuple(m["role"] for m in r.messages) for r in rows}
    assert roles == ({("user",)} if split == "rl" else {("user", "assistant")})
    with_images = sum(bool(r.images) for r in rows)
    assert 0 < with_images < len(rows)  # text and image examples are mixed
    assert all(1 <= r.difficulty <= 5 for r in rows)


def test_sft_answers_are_boxed_reference_answers(small_data_dir):
    for row in RowLoader(small_data_dir / "joint_sft" / "train.jsonl").load_all():
        assert row.messages[-1]["content"] == f"\\boxed{{{row.answer}}}"


def test_long_cot_replies_box_the_answer_their_trace_ends_at(small_data_dir):
    for row in RowLoader(small_data_dir / "long_cot" / "train.jsonl").load_all():
        reasoning, reply = row.messages[-1]["reasoning_content"], row.messages[-1]["content"]
        assert reply == f"\\boxed{{{row.answer}}}"
        assert reasoning.endswith(f" {row.answer}.") or reasoning.endswith(f"({row.answer}).")


def _steps(reasoning: str) -> dict[str, str]:
    """The trace's worked steps, "X = Y", as {X: Y}."""
    return dict(re.findall(r"(\w+(?: all)?) = (\w+)\.", reasoning))


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4, 5])
def test_every_step_of_a_trace_is_what_the_image_or_the_sum_gives(difficulty):
    """Counted from the pixels, independently of the generator: each colour a trace counts, the
    total it adds up, the colour it names; a sum's value from the expression."""
    for index in range(10):
        for kind in ("count", "colour", "arith"):
            task = make_task(kind, np.random.default_rng([11, difficulty, index]), difficulty, 112)
            steps = _steps(long_cot_reasoning(task))
            if task.image is None:
                expression = task.question.removeprefix("What is ").removesuffix("?")
                assert steps == {"sum": str(eval(expression, {"__builtins__": {}}))}  # noqa: S307
                continue
            pixels = {c: _count_colour(task.image, c) for c in COLOURS}
            if kind == "colour" and not task.choices:
                assert steps == {"square": max(pixels, key=pixels.get)}
            elif kind == "count":
                colour = task.question.split()[2]
                assert steps == {colour: str(pixels[colour])}
            else:  # every colour in the same order, then the total or the most frequent one
                counted = {c: str(n) for c, n in pixels.items()}
                assert list(steps)[:4] == sorted(COLOURS)
                assert {c: steps[c] for c in COLOURS} == counted
                if kind == "arith":
                    assert steps["in all"] == str(sum(pixels.values())) == task.answer


def test_long_cot_traces_show_all_four_behaviours(small_data_dir):
    for row in RowLoader(small_data_dir / "long_cot" / "train.jsonl").load_all():
        reasoning = row.messages[-1]["reasoning_content"]
        assert trace_behaviours(reasoning) == set(BEHAVIOUR_MARKERS)
        # The markers come in the recipe's order: plan, check, reflect, explore.
        positions = [reasoning.index(m) for m in BEHAVIOUR_MARKERS.values()]
        assert positions == sorted(positions)
        assert row.messages[-1]["content"].removeprefix("\\boxed{").removesuffix("}") in \
            reasoning.split(BEHAVIOUR_MARKERS["exploration"])[-1]


def test_traces_vary_in_length_by_redundant_checks_that_carry_no_behaviour_marker():
    from collections import Counter

    from kimivl_rl.data.traces import MAX_EXTRA_CHECKS, extra_checks

    spec = BuildSpec()
    tasks = [sample_task(spec, "long_cot", "train", i) for i in range(300)]
    counts = Counter(extra_checks(t) for t in tasks)
    assert sorted(counts) == list(range(MAX_EXTRA_CHECKS + 1))
    assert min(counts.values()) > 300 / (MAX_EXTRA_CHECKS + 1) / 2  # roughly uniform
    for task in tasks:
        reasoning = long_cot_reasoning(task)
        # every "Let me check" is the one evaluation check: dropping redundant checks keeps the format
        assert reasoning.count(BEHAVIOUR_MARKERS["evaluation"]) == 1
    by_count = {}
    for task in tasks:
        by_count.setdefault(extra_checks(task), []).append(len(long_cot_reasoning(task).split()))
    means = [sum(v) / len(v) for _, v in sorted(by_count.items())]
    assert means == sorted(means) and means[-1] > 1.5 * means[0]


def test_eval_split_differs_from_train(small_data_dir):
    train = (small_data_dir / "rl" / "train.jsonl").read_text().splitlines()
    evaluation = (small_data_dir / "rl" / "eval.jsonl").read_text().splitlines()
    assert train[:20] != evaluation


def _count_colour(image: Image.Image, colour: str) -> int:
    """Count connected blobs of one colour, independently of the generator's bookkeeping."""
    pixels = np.array(image)
    mask = np.all(pixels == COLOURS[colour], axis=-1)
    seen = np.zeros_like(mask)
    blobs = 0
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        blobs += 1
        stack = [(y, x)]
        while stack:
            cy, cx = stack.pop()
            if 0 <= cy < mask.shape[0] and 0 <= cx < mask.shape[1] and mask[cy, cx] and not seen[cy, cx]:
                seen[cy, cx] = True
                stack += [(cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)]
    return blobs


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4, 5])
def test_image_answers_match_the_pixels(difficulty):
    for index in range(15):
        rng = np.random.default_rng([7, difficulty, index])
        count = make_task("count", rng, difficulty, 112)
        colour = count.question.split()[2]
        assert _count_colour(count.image, colour) == int(count.answer)
        task = make_task("colour", rng, difficulty, 112)
        counts = {c: _count_colour(task.image, c) for c in COLOURS}
        winner = task.choices[task.answer] if task.choices else task.answer
        assert counts[winner] == max(counts.values())
        assert list(counts.values()).count(counts[winner]) == 1
        if difficulty >= 3:
            total = make_task("arith", rng, difficulty, 112)
            assert sum(_count_colour(total.image, c) for c in COLOURS) == int(total.answer)


def test_arithmetic_answers_are_right():
    spec = BuildSpec(arith_fraction=1.0)
    for index in range(200):
        task = sample_task(spec, "rl", "train", index)
        if task.image is None:
            expression = task.question.removeprefix("What is ").removesuffix("?")
            assert eval(expression, {"__builtins__": {}}) == int(task.answer)  # noqa: S307 (own text)
        else:
            assert task.difficulty >= 3 and task.answer == str(len(task.squares))


def test_difficulty_grows_with_level():
    """Higher levels mean more objects and distractors (counts), more terms, then more colours
    to add up (arithmetic)."""
    def mean_squares(kind, level):
        return np.mean([len(make_task(kind, np.random.default_rng([level, i]), level, 112).squares)
                        for i in range(200)])

    means = [mean_squares("count", level) for level in range(1, 6)]
    assert means == sorted(means) and means[-1] > 3 * means[0]
    terms = [make_task("arith", np.random.default_rng(i), level, 112).question.count("+")
             for i, level in enumerate([1, 2])]
    assert terms == [1, 2]
    totals = [mean_squares("arith", level) for level in range(3, 6)]
    assert totals == sorted(totals)


def test_task_mix_follows_arith_fraction():
    spec = BuildSpec(arith_fraction=0.5)
    kinds = Counter(sample_task(spec, "joint_sft", "train", i).kind for i in range(400))
    assert 150 < kinds["arith"] < 250
    assert kinds["count"] > 50 and kinds["colour"] > 50

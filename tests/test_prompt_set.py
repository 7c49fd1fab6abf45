"""RL's prompt set: multiple-choice and true/false prompts, which a guess answers, are left out
(k1.5's prompt-set curation); the rest, and every evaluation prompt, stay."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from kimivl_rl.config import load_config
from kimivl_rl.data.errors import DataError
from kimivl_rl.data.rows import RowLoader
from kimivl_rl.rl.prompt_set import easy_to_hack, hard_to_hack
from kimivl_rl.system.controller import rl_prompts

COLOUR_OPTIONS = "Which colour appears most often? (A) blue (B) green (C) red (D) yellow"


@pytest.mark.parametrize("question, answer, reason", [
    (COLOUR_OPTIONS, "B", "multiple choice"),
    (COLOUR_OPTIONS, "(d)", "multiple choice"),
    ("Pick one.\n(A) 3 (B) 4", "option A", "multiple choice"),
    ("Is the square red?", "Yes", "true/false"),
    ("True or false: 7 is prime.", "true", "true/false"),
    ("Which vitamin is in citrus fruit?", "C", None),      # a letter, but no options listed
    (COLOUR_OPTIONS, "E", None),                             # not among the options
    ("What colour is the square?", "yellow", None),
    ("What is 2 + 3 + 8?", "13", None),
])
def test_a_prompt_is_easy_to_hack_when_a_guess_among_few_answers_can_be_right(question, answer, reason):
    assert easy_to_hack(question, answer) == reason


def test_the_options_are_read_from_the_user_text_not_the_image_parts(small_data_dir):
    rows = RowLoader.prompts(load_config("configs/tiny.yaml", [f"data.dir={small_data_dir}"]).data,
                             "rl/train.jsonl")
    choice = next(r for r in rows if r.answer in set("ABCD"))
    assert "(A)" in choice.question_text() and "<image>" not in choice.question_text()


def test_rl_trains_on_the_built_in_prompts_but_the_multiple_choice_ones(small_data_dir):
    cfg = load_config("configs/tiny.yaml", [f"data.dir={small_data_dir}"])
    every = RowLoader.prompts(cfg.data, cfg.rl.train_file)
    kept = rl_prompts(cfg)
    left_out = [r for r in every if r.source not in {k.source for k in kept}]
    assert left_out and kept
    # the built-in data's multiple-choice question is the colour question from difficulty 3
    assert all(r.extra["task"] == "colour" and r.difficulty >= 3 for r in left_out)
    assert Counter(r.answer in set("ABCD") for r in every)[True] == len(left_out)
    assert hard_to_hack([(r.question_text(), r.answer) for r in every])[1] == Counter(
        {"multiple choice": len(left_out)})
    assert len(rl_prompts(load_config("configs/tiny.yaml", [
        f"data.dir={small_data_dir}", "rl.exclude_easy_to_hack=false"]))) == len(every)


def test_a_train_file_of_only_guessable_prompts_is_an_error_naming_it_and_the_key(tmp_path):
    (tmp_path / "rl").mkdir()
    rows = [{"messages": [{"role": "user", "content": "Is 4 even?"}], "answer": "yes"},
            {"messages": [{"role": "user", "content": COLOUR_OPTIONS}], "answer": "A"}]
    (tmp_path / "rl" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config("configs/tiny.yaml", [f"data.dir={tmp_path}"])
    with pytest.raises(DataError, match=r"rl/train.jsonl: every prompt .*rl.exclude_easy_to_hack=false"):
        rl_prompts(cfg)

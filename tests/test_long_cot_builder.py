"""``kimivl-rl data build-long-cot``: the filters, dedup and statistics on hand-written responses,
the file output with a stand-in sampler, and one run with the real rollout and reward actors."""
from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image

import kimivl_rl.system.actors
from kimivl_rl.config import load_config
from kimivl_rl.system import long_cot_builder as lcb
from kimivl_rl.system.long_cot_builder import (PromptStats, TraceFilter, Verdict, dedup_key, filter_prompt,
                                             format_summary, judge_trace, long_cot_row, normalise_text,
                                             place_image, total_stats)
from kimivl_rl.data.rows import DataError, Example, RowLoader
from kimivl_rl.prepare import with_absolute_paths
from kimivl_rl.reward.contract import RewardInput, RewardOutput, answer_only_reward
from kimivl_rl.types import Sample

THINKING = ("First I will add the numbers. 2 + 2 = 4. Let me check: 4 - 2 = 2, right. "
            "Wait, did I use both numbers? Yes. Let me try another way: 2 * 2 = 4.")
GOOD = f"<think>{THINKING}</think>\\boxed{{4}}"
RIGHT = RewardOutput(1.0, "correct", "4")
WRONG = RewardOutput(0.0, "wrong answer", "5")
NO_ANSWER = RewardOutput(0.0, "no answer found")
ALL = TraceFilter()


def sample(text: str, tokens: int = 40, finish: str = "stop") -> Sample:
    return Sample("p", [1, 2], list(range(tokens)), [0.0] * tokens, finish, text)


# ----------------------------------------------------------------------------- one response

def test_a_verified_trace_with_all_behaviours_is_kept_split_into_thinking_and_answer():
    verdict = judge_trace(GOOD, 40, "stop", RIGHT, ALL)
    assert verdict == Verdict(None, 40, THINKING, "\\boxed{4}",
                              ("evaluation", "exploration", "planning", "reflection"))


def test_rejection_reasons_in_order():
    filt = TraceFilter(min_response_tokens=10, max_response_tokens=50)
    # A wrong answer is a wrong answer whatever else is the matter with it.
    assert judge_trace("short", 2, "length", WRONG, filt).reason == "wrong_answer"
    assert judge_trace(GOOD, 9, "stop", RIGHT, filt).reason == "too_short"
    assert judge_trace(GOOD, 10, "stop", RIGHT, filt).reason is None
    assert judge_trace(GOOD, 50, "stop", RIGHT, filt).reason is None
    assert judge_trace(GOOD, 51, "stop", RIGHT, filt).reason == "too_long"
    # Cut off at max_new_tokens: too long, even without a max_response_tokens.
    assert judge_trace(GOOD, 30, "length", RIGHT, ALL).reason == "too_long"
    assert judge_trace(GOOD, 10_000, "stop", RIGHT, ALL).reason is None


def test_behaviour_count_and_thinking_section():
    three = GOOD.replace("Wait,", "And")
    assert judge_trace(three, 40, "stop", RIGHT, ALL) == Verdict(
        "missing_behaviours", 40, THINKING.replace("Wait,", "And"), "\\boxed{4}",
        ("evaluation", "exploration", "planning"))
    assert judge_trace(three, 40, "stop", RIGHT, TraceFilter(min_behaviours=3)).reason is None
    # Markers in the answer section do not count: only the thinking is searched.
    outside = "<think>2 + 2 = 4.</think>First I will say: \\boxed{4}"
    assert judge_trace(outside, 40, "stop", RIGHT, TraceFilter(min_behaviours=1)).reason == "missing_behaviours"
    # No thinking section, or an empty one, is never a long-CoT trace.
    for text in ("\\boxed{4}", "<think> \n </think>\\boxed{4}"):
        assert judge_trace(text, 40, "stop", RIGHT, TraceFilter(min_behaviours=0)).reason == "missing_behaviours"
    # The generation prompt may open the thinking section itself; other markers work too.
    assert judge_trace(f"{THINKING}</think>\\boxed{{4}}", 40, "stop", RIGHT, ALL).reasoning == THINKING
    kimi = TraceFilter(think_open="◁think▷", think_close="◁/think▷")
    assert judge_trace(f"◁think▷{THINKING}◁/think▷ \\boxed{{4}} ", 40, "stop", RIGHT, kimi) == Verdict(
        None, 40, THINKING, "\\boxed{4}", ("evaluation", "exploration", "planning", "reflection"))


def test_dedup_key_ignores_case_and_whitespace_only():
    assert normalise_text("  Let me\tCHECK\n\n it ") == "let me check it"
    assert normalise_text("ｆｕｌｌ width") == "full width"  # NFKC
    assert dedup_key(THINKING, "\\boxed{4}") == dedup_key(THINKING.upper().replace(" ", "  \n"), " \\boxed{4}")
    assert dedup_key(THINKING, "\\boxed{4}") != dedup_key(THINKING, "\\boxed{4.0}")
    assert dedup_key(THINKING, "\\boxed{4}") != dedup_key(THINKING + " Done.", "\\boxed{4}")
    # Thinking and answer stay apart: moving text across the boundary is a different trace.
    assert dedup_key("a b", "c") != dedup_key("a", "b c")


# ----------------------------------------------------------------------------- one prompt

def test_filter_prompt_counts_every_sample_once():
    other = GOOD.replace("2 * 2 = 4", "4 / 1 = 4")
    variant = GOOD.replace("add the numbers.", "ADD the\n numbers.  ")  # same text, normalised
    samples = [sample(GOOD), sample("\\boxed{5}"), sample(variant),
               sample(other, tokens=5), sample(other), sample("no idea"), sample(GOOD, finish="length"),
               sample(GOOD.replace("Wait,", "So")), sample("  " + GOOD + "\n")]
    rewards = [RIGHT, WRONG, RIGHT, RIGHT, RIGHT, NO_ANSWER, RIGHT, RIGHT, RIGHT]
    kept, stats = filter_prompt("rl.jsonl:3", samples, rewards, TraceFilter(min_response_tokens=10))
    assert [v.reasoning for v in kept] == [THINKING, other[7:other.index("</think>")]]
    assert stats == PromptStats("rl.jsonl:3", sampled=9, kept=2,
                                rejected={"wrong_answer": 2, "too_short": 1, "too_long": 1,
                                          "missing_behaviours": 1, "duplicate": 2},
                                reward_reasons={"wrong answer": 1, "no answer found": 1})
    assert stats.kept + sum(stats.rejected.values()) == stats.sampled
    with pytest.raises(ValueError):
        filter_prompt("x", samples, rewards[:-1], ALL)  # one reward per sample


def test_a_rejected_trace_does_not_make_a_later_copy_a_duplicate():
    kept, stats = filter_prompt("p", [sample(GOOD, tokens=3), sample(GOOD)], [RIGHT, RIGHT],
                                TraceFilter(min_response_tokens=10))
    assert len(kept) == 1 and stats.rejected["too_short"] == 1 and stats.rejected["duplicate"] == 0


def test_totals_and_summary():
    a = PromptStats("f:1", 4, 1, {"wrong_answer": 2, "too_short": 0, "too_long": 1,
                                  "missing_behaviours": 0, "duplicate": 0}, {"wrong answer": 2})
    b = PromptStats("f:2", 4, 0, {"wrong_answer": 3, "too_short": 0, "too_long": 0,
                                  "missing_behaviours": 1, "duplicate": 0},
                    {"wrong answer": 1, "no answer found": 2})
    totals = total_stats([a, b])
    assert totals == {"prompts": 2, "sampled": 8, "kept": 1, "keep_rate": 0.125, "prompts_with_kept": 1,
                      "rejected": {"wrong_answer": 5, "too_short": 0, "too_long": 1,
                                   "missing_behaviours": 1, "duplicate": 0},
                      "reward_reasons": {"no answer found": 2, "wrong answer": 3}}
    assert total_stats([])["keep_rate"] == 0.0
    assert format_summary({"totals": totals, "output": "o.jsonl", "stats_file": "o.stats.json"}) == (
        "long-CoT set: kept 1 of 8 sampled traces (12.5%), 1 of 2 prompts have at least one\n"
        "rejected: wrong_answer 5, too_short 0, too_long 1, missing_behaviours 1, duplicate 0\n"
        "wrong answers by reward reason: no answer found: 2, wrong answer: 3\n"
        "rows:  o.jsonl\nstats: o.stats.json")


# ----------------------------------------------------------------------------- rows and images

def test_row_format_loads_and_renders_the_trace(tmp_path):
    Image.new("RGB", (28, 28), "red").save(tmp_path / "sq.png")
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many?"}]}]
    example = Example(prompt, [], "4", 2.0, None, "in.jsonl:7", {"task": "count"})
    verdict = judge_trace(GOOD, 40, "stop", RIGHT, ALL)
    row = long_cot_row(example, verdict, ["sq.png"])
    assert row == {"messages": [*prompt, {"role": "assistant", "reasoning_content": THINKING,
                                          "content": "\\boxed{4}"}],
                   "images": ["sq.png"], "answer": "4", "difficulty": 2.0, "task": "count",
                   "long_cot": {"prompt": "in.jsonl:7", "response_tokens": 40,
                                "behaviours": ["evaluation", "exploration", "planning", "reflection"]}}
    (tmp_path / "out.jsonl").write_text(json.dumps(row) + "\n")
    (loaded,) = RowLoader(tmp_path / "out.jsonl", require_answer=True).load_all()
    assert loaded.messages[-1]["reasoning_content"] == THINKING and loaded.images[0].size == (28, 28)


def test_place_image(tmp_path):
    data = tmp_path / "data" / "rl"
    # Output beside the prompts, or in a directory above them: referenced where it is.
    assert place_image("images/a.png", data, data, "x_images") == ("images/a.png", None)
    assert place_image("images/a.png", data, tmp_path / "data", "x_images") == ("rl/images/a.png", None)
    # Anywhere else: copied under the output's image directory, keeping its relative path.
    assert place_image("images/a.png", data, tmp_path / "lc", "set_images") == (
        "set_images/images/a.png", (data / "images/a.png").resolve())
    assert place_image("a.png", data, data / "sub", "s_images") == ("s_images/a.png", (data / "a.png").resolve())


# ----------------------------------------------------------------------------- the whole build

def _prompts_file(directory, rows: int = 3):
    (directory / "images").mkdir(parents=True)
    Image.new("RGB", (56, 56), "blue").save(directory / "images" / "q0.png")
    lines = [{"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}],
              "images": ["images/q0.png"], "answer": "blue", "task": "colour"},
             {"messages": [{"role": "user", "content": "What is 2 + 2?"},
                           {"role": "assistant", "content": "\\boxed{4}"}], "answer": "4"},
             {"messages": [{"role": "user", "content": "What is 1 + 1?"}], "answer": "2", "difficulty": 1}]
    path = directory / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in lines[:rows]) + "\n\n")
    return path


def _blue(thinking_extra: str = "") -> str:
    return (f"<think>First I will look. Let me check the pixels. Wait, the background is white. "
            f"Let me try another way: the colour is blue.{thinking_extra}</think>\\boxed{{blue}}")


def test_build_writes_loadable_rows_images_and_stats(tmp_path, monkeypatch):
    prompts = _prompts_file(tmp_path / "data")
    responses = {"Colour?": [_blue(), _blue().replace("look", "LOOK"), _blue(" Sure."), "\\boxed{red}"],
                 "What is 2 + 2?": [GOOD, "<think>hm", "\\boxed{4}", GOOD.replace("4}", "5}")],
                 "What is 1 + 1?": ["\\boxed{2}"] * 4}
    calls = []

    def fake_sample_and_score(cfg, model_path, chunk_prompts, n, temperature, desc):
        calls.append((model_path, n, temperature, cfg.rollout.max_new_tokens))
        samples, scores = [], []
        for ex in chunk_prompts:
            question = ex.messages[0]["content"]
            question = question if isinstance(question, str) else question[1]["text"]
            group = [sample(t, tokens=len(t) // 4, finish="length" if t == "<think>hm" else "stop")
                     for t in responses[question]]
            samples.append(group)
            scores += [answer_only_reward(RewardInput(s.text, ex.answer)) for s in group]
        yield chunk_prompts, samples, scores

    monkeypatch.setattr(kimivl_rl.system.actors, "sample_and_score", fake_sample_and_score)
    cfg = load_config(None, ["long_cot_builder.samples_per_prompt=4", "rollout.temperature=0.8",
                             "rollout.max_new_tokens=64"])
    out = tmp_path / "lc" / "set.jsonl"
    stats = lcb.build_long_cot(cfg, "teacher-dir", prompts, out)
    assert calls == [("teacher-dir", 4, 0.8, 64)]

    rows = RowLoader(out, require_answer=True).load_all()
    assert [(r.answer, r.messages[-1]["content"]) for r in rows] == [
        ("blue", "\\boxed{blue}"), ("blue", "\\boxed{blue}"), ("4", "\\boxed{4}")]
    assert rows[0].images[0].size == (56, 56)
    assert (out.parent / "set_images" / "images" / "q0.png").is_file()
    raw = [json.loads(line) for line in out.read_text().splitlines()]
    assert raw[0]["images"] == ["set_images/images/q0.png"] and raw[0]["task"] == "colour"
    # The prompt's own assistant turn is replaced by the teacher's trace.
    assert [m["role"] for m in raw[2]["messages"]] == ["user", "assistant"]
    assert raw[2]["long_cot"]["prompt"] == f"{prompts.resolve()}:2"
    for r in rows:  # every kept row, rendered as the model would write it, is verified correct
        m = r.messages[-1]
        assert answer_only_reward(RewardInput(f"<think>{m['reasoning_content']}</think>{m['content']}",
                                              r.answer)).score == 1.0

    saved = json.loads((tmp_path / "lc" / "set.stats.json").read_text())
    assert saved == stats
    assert saved["settings"] == {"samples_per_prompt": 4, "temperature": 0.8, "top_p": 1.0,
                                 "max_new_tokens": 64, "seed": 0, "min_response_tokens": 0,
                                 "max_response_tokens": None, "min_behaviours": 4,
                                 "think_open": "<think>", "think_close": "</think>"}
    assert [(p["kept"], p["rejected"]) for p in saved["per_prompt"]] == [
        (2, {"wrong_answer": 1, "too_short": 0, "too_long": 0, "missing_behaviours": 0, "duplicate": 1}),
        (1, {"wrong_answer": 2, "too_short": 0, "too_long": 0, "missing_behaviours": 1, "duplicate": 0}),
        (0, {"wrong_answer": 0, "too_short": 0, "too_long": 0, "missing_behaviours": 4, "duplicate": 0})]
    assert saved["totals"]["kept"] == 3 and saved["totals"]["sampled"] == 12
    assert saved["totals"]["reward_reasons"] == {"unclosed thinking section": 1, "wrong answer": 2}
    assert not list(out.parent.glob("*.partial"))

    # Written beside the prompts, rows reference the prompts' own images.
    beside = lcb.build_long_cot(cfg, "teacher-dir", prompts, prompts.with_name("lc.jsonl"))
    assert beside["totals"]["kept"] == 3
    first = json.loads(prompts.with_name("lc.jsonl").read_text().splitlines()[0])
    assert first["images"] == ["images/q0.png"]
    with pytest.raises(DataError, match="overwrite"):
        lcb.build_long_cot(cfg, "teacher-dir", prompts, prompts)
    with pytest.raises(DataError, match="JSONL"):
        lcb.build_long_cot(cfg, "teacher-dir", prompts, tmp_path / "x.parquet")


def test_cli_flags_override_the_config(tmp_path, monkeypatch, capsys):
    from kimivl_rl import cli

    seen = {}

    def fake_build(cfg, teacher, prompts_file, out_file):
        seen.update(cfg=cfg, teacher=teacher, prompts=prompts_file, out=out_file)
        return {"totals": total_stats([]), "output": str(out_file), "stats_file": "s.json"}

    monkeypatch.setattr(lcb, "build_long_cot", fake_build)
    (tmp_path / "teacher").mkdir()
    args = ["data", "build-long-cot", "--teacher", tmp_path / "teacher", "--prompts", "p.jsonl",
            "--out", "o.jsonl", "configs/tiny.yaml", "rollout.top_p=0.9", "--samples", "3",
            "--max-new-tokens", "99", "--min-tokens", "5", "--max-tokens", "80", "--min-behaviours", "2"]
    assert cli.main([str(a) for a in args]) == 0
    cfg = seen["cfg"]
    assert seen["teacher"] == str((tmp_path / "teacher").resolve())
    assert (cfg.long_cot_builder.samples_per_prompt, cfg.long_cot_builder.min_response_tokens,
            cfg.long_cot_builder.max_response_tokens, cfg.long_cot_builder.min_behaviours) == (3, 5, 80, 2)
    tiny_temperature = load_config("configs/tiny.yaml").rollout.temperature  # not overridden
    assert (cfg.rollout.max_new_tokens, cfg.rollout.top_p, cfg.rollout.temperature) == \
        (99, 0.9, tiny_temperature)
    assert "kept 0 of 0 sampled" in capsys.readouterr().out
    # Defaults come from the config; bad values fail like any config value.
    assert cli.main(["data", "build-long-cot", "--teacher", "t", "--prompts", "p.jsonl",
                     "--out", "o.jsonl"]) == 0
    assert seen["cfg"].long_cot_builder.samples_per_prompt == 8 and seen["cfg"].rollout.max_new_tokens == 256
    assert seen["teacher"] == "t"  # not a local path: passed on as given (a hub name)
    assert cli.main(["data", "build-long-cot", "--teacher", "t", "--prompts", "p.jsonl",
                     "--out", "o.jsonl", "--min-behaviours", "5"]) == 2
    assert "long_cot_builder.min_behaviours: 5 is out of range" in capsys.readouterr().err


# ----------------------------------------------------------------------------- on Ray

@pytest.mark.slow
def test_build_with_rollout_and_reward_actors(tmp_path, tiny_model_dir, small_data_dir, ray_cluster):
    data = tmp_path / "data"
    shutil.copytree(small_data_dir / "rl", data)
    rows = (data / "train.jsonl").read_text().splitlines()[:4]  # image and text prompts
    assert any('"images": ["images/' in r for r in rows) and any('"images": []' in r for r in rows)
    (data / "few.jsonl").write_text("\n".join(rows) + "\n")
    cfg = with_absolute_paths(load_config("configs/tiny.yaml", [
        f"model.path={tiny_model_dir}", "model.init_if_missing=false", f"data.dir={data}",
        "data.build_if_missing=false", f"output.dir={tmp_path / 'out'}",
        "long_cot_builder.samples_per_prompt=4", "rollout.max_new_tokens=16",
        "long_cot_builder.min_behaviours=0"]))
    out = tmp_path / "lc" / "set.jsonl"
    stats = lcb.build_long_cot(cfg, str(tiny_model_dir), data / "few.jsonl", out)

    kept_rows = RowLoader(out, require_answer=True).load_all()  # loads, images and all
    assert len(kept_rows) == stats["totals"]["kept"]
    for r in kept_rows:  # a random-init teacher rarely gets here; when it does, it is right
        m = r.messages[-1]
        assert answer_only_reward(RewardInput(f"<think>{m['reasoning_content']}</think>{m['content']}",
                                              r.answer)).score == 1.0
    assert json.loads(out.with_name("set.stats.json").read_text()) == stats
    assert len(stats["per_prompt"]) == 4
    for p in stats["per_prompt"]:
        assert p["sampled"] == 4
        assert p["kept"] + sum(p["rejected"].values()) == 4
        assert sum(p["reward_reasons"].values()) == p["rejected"]["wrong_answer"]
    totals = stats["totals"]
    assert totals["sampled"] == 16 and totals["kept"] + sum(totals["rejected"].values()) == 16
    # 16 tokens of a random-init model: mostly wrong answers, each with the reward's reason.
    assert totals["rejected"]["wrong_answer"] > 0 and totals["reward_reasons"]

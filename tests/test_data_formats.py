"""The field's row shapes (EasyR1, verl, LLaVA, TRL) load as the project's own examples, with
embedded images checked like path images, through the loader, ``data check`` and ``data convert``."""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from kimivl_rl.cli import main
from kimivl_rl.config import ConfigError, load_config
from kimivl_rl.config.schema import DataConfig
from kimivl_rl.data.convert import convert_file
from kimivl_rl.data.formats import RowFormat, image_source, text_parts
from kimivl_rl.data.rows import DataError, RowLoader

RED, BLUE = (255, 0, 0), (0, 0, 255)
IMAGE = {"type": "image"}


def png(color, size=(28, 28)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


def text(words: str) -> dict:
    return {"type": "text", "text": words}


def colours(example) -> list:
    return [image.getpixel((0, 0)) for image in example.images]


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def easyr1_rows() -> list[dict]:
    return [{"problem": "<image>Find x.", "answer": "30",
             "images": [{"bytes": png(RED), "path": "a.png"}]},
            {"problem": "Is <image> bigger than <image>?", "answer": "no",
             "images": [{"bytes": png(RED), "path": None}, {"bytes": png(BLUE), "path": None}]}]


def verl_rows() -> list[dict]:
    return [{"data_source": "geo3k",
             "prompt": [{"role": "system", "content": "Think first."},
                        {"role": "user", "content": "<image>What is the angle?"}],
             "images": [{"bytes": png(BLUE), "path": None}], "ability": "math",
             "reward_model": {"ground_truth": "45", "style": "rule"},
             "extra_info": {"split": "train", "index": 0}}]


def llava_rows() -> list[dict]:
    return [{"id": "r1", "image": "img/red.png",
             "conversations": [{"from": "human", "value": "<image>\nWhat colour is it?"},
                               {"from": "gpt", "value": "Red."}]},
            {"id": "r2", "conversations": [{"from": "human", "value": "Say hi."},
                                           {"from": "gpt", "value": "Hi."}]}]


def trl_rows() -> list[dict]:
    encoded = base64.b64encode(png(BLUE)).decode()
    return [{"messages": [{"role": "user", "content": "<image>How many?"},
                          {"role": "assistant", "content": "2"}],
             "images": [f"data:image/png;base64,{encoded}"], "answer": "2"},
            {"messages": [{"role": "user", "content": "<image><image>Same?"},
                          {"role": "assistant", "content": "No"}],
             "images": [encoded, {"bytes": encoded, "path": None}], "answer": "no"}]


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    """One small file of each shape, images embedded except LLaVA's path."""
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "red.png").write_bytes(png(RED))
    llava_json = tmp_path / "llava.json"
    llava_json.write_text(json.dumps(llava_rows()))
    return {"easyr1": write_parquet(tmp_path / "geo3k.parquet", easyr1_rows()),
            "verl": write_parquet(tmp_path / "verl.parquet", verl_rows()),
            "llava": write_jsonl(tmp_path / "llava.jsonl", llava_rows()),
            "llava_json": llava_json,
            "trl": write_jsonl(tmp_path / "trl.jsonl", trl_rows())}


# ----------------------------------------------------------------------------- pure shaping

def test_placeholders_become_image_parts_in_order():
    assert text_parts("<image>\nA <image> B") == [IMAGE, text("A"), IMAGE, text("B")]
    assert text_parts("no images") == "no images"


def test_image_sources_of_every_shape():
    raw = png(RED)
    encoded = base64.b64encode(raw).decode()
    assert image_source({"bytes": raw, "path": "x.png"}) == raw
    assert image_source({"bytes": None, "path": "x.png"}) == "x.png"
    assert image_source({"bytes": encoded}) == raw
    assert image_source(f"data:image/png;base64,{encoded}") == raw
    assert image_source(encoded) == raw
    assert image_source("images/iVBORw0KGgo.png") == "images/iVBORw0KGgo.png"
    assert image_source(3) is None


# ----------------------------------------------------------------------------- the loader

def test_easyr1_parquet_with_embedded_images(files, caplog):
    caplog.set_level("INFO")
    loader = RowLoader(files["easyr1"], require_answer=True)
    first, second = loader.load_all()
    assert loader.format == "easyr1" and "format 'easyr1'" in caplog.text
    assert first.messages == [{"role": "user", "content": [IMAGE, text("Find x.")]}]
    assert first.answer == "30" and colours(first) == [RED]
    assert second.messages == [{"role": "user", "content": [text("Is"), IMAGE, text("bigger than"),
                                                            IMAGE, text("?")]}]
    assert second.answer == "no" and colours(second) == [RED, BLUE]
    assert first.source == f"{files['easyr1']}:1" and first.extra == {}


def test_verl_parquet(files):
    (row,) = RowLoader(files["verl"], require_answer=True).load_all()
    assert row.messages == [{"role": "system", "content": "Think first."},
                            {"role": "user", "content": [IMAGE, text("What is the angle?")]}]
    assert row.answer == "45" and colours(row) == [BLUE]
    assert row.extra == {"data_source": "geo3k", "ability": "math",
                         "extra_info": {"split": "train", "index": 0}}


@pytest.mark.parametrize("name", ["llava", "llava_json"])
def test_llava_sft_rows(files, name):
    loader = RowLoader(files[name])
    image_row, text_row = loader.load_all()
    assert loader.format == "llava"
    assert image_row.messages == [{"role": "user", "content": [IMAGE, text("What colour is it?")]},
                                  {"role": "assistant", "content": "Red."}]
    assert colours(image_row) == [RED] and image_row.answer == "Red"
    assert image_row.extra == {"id": "r1"} and image_row.source == f"{files[name]}:1"
    assert text_row.messages == [{"role": "user", "content": "Say hi."},
                                 {"role": "assistant", "content": "Hi."}]
    assert text_row.images == [] and text_row.answer == "Hi"


def test_a_llava_rows_reference_is_its_answer_field_or_its_last_gpt_turn(tmp_path):
    """An ``answer`` field wins; else the last ``gpt`` turn read as the reward reads a response
    (its last ``\\boxed{}`` here); a row ending on a human turn has none, which an RL or
    evaluation file refuses with the row's place."""
    turns = [{"from": "human", "value": "How many?"}, {"from": "gpt", "value": "So \\boxed{4}."}]
    path = write_jsonl(tmp_path / "llava.jsonl", [
        {"conversations": turns, "answer": "four"}, {"conversations": turns},
        {"conversations": turns[:1]}])
    assert [e.answer for e in RowLoader(path).load_all()] == ["four", "4", None]
    with pytest.raises(DataError, match=r"llava.jsonl:3: missing field 'answer' \(required in this file\)"):
        RowLoader(path, require_answer=True).load_all()


def test_trl_chat_rows_with_base64_images(files):
    loader = RowLoader(files["trl"], require_answer=True)
    one, two = loader.load_all()
    assert loader.format == "messages"
    assert one.messages == [{"role": "user", "content": [IMAGE, text("How many?")]},
                            {"role": "assistant", "content": "2"}]
    assert colours(one) == [BLUE] and colours(two) == [BLUE, BLUE]
    assert two.prompt_messages() == [{"role": "user", "content": [IMAGE, IMAGE, text("Same?")]}]


def test_typed_rows_keep_a_literal_placeholder_in_their_text(tmp_path):
    (tmp_path / "a.png").write_bytes(png(RED))
    messages = [{"role": "user", "content": [IMAGE, text("What does <image> mean in HTML?")]}]
    path = write_jsonl(tmp_path / "rows.jsonl", [{"messages": messages, "images": ["a.png"]}])
    assert RowLoader(path).load_all()[0].messages == messages


def test_key_mapping_and_prompt_template(tmp_path):
    rows = [{"question": "2+<image>?", "solution": "5", "pics": [{"bytes": png(RED), "path": None}]}]
    path = write_parquet(tmp_path / "mine.parquet", rows)
    cfg = DataConfig(dir=str(tmp_path), prompt_key="question", answer_key="solution",
                     image_key="pics", prompt_template="{problem} Put it in \\boxed{}.")
    (row,) = RowLoader.prompts(cfg, "mine.parquet")
    assert row.messages == [{"role": "user", "content": [text("2+"), IMAGE, text("? Put it in \\boxed{}.")]}]
    assert row.answer == "5" and colours(row) == [RED]


def test_the_template_wraps_typed_rows_too(tmp_path):
    (tmp_path / "a.png").write_bytes(png(RED))
    messages = [{"role": "user", "content": [IMAGE, text("How many?")]}]
    path = write_jsonl(tmp_path / "rows.jsonl", [{"messages": messages, "images": ["a.png"]}])
    (row,) = RowLoader(path, row_format=RowFormat(prompt_template="Look. {problem} Be brief.")).load_all()
    assert row.messages[0]["content"] == [text("Look."), IMAGE, text("How many? Be brief.")]


def test_sft_sources_read_foreign_formats(files):
    from kimivl_rl.sft.sources import stage_examples

    cfg = load_config(None, [f"data.dir={files['llava'].parent}", "sft.joint.train_file=llava.jsonl"])
    (image_row, _) = stage_examples(cfg, "joint")
    assert image_row.messages[-1] == {"role": "assistant", "content": "Red."}


# ----------------------------------------------------------------------------- errors

ERRORS = {
    "placeholder count": ("easyr1", {"problem": "<image><image>Compare.", "answer": "1",
                                     "images": [{"bytes": png(RED), "path": None}]},
                          "field 'images': the messages have 2 image placeholder(s) but the row "
                          "lists 1 image(s)"),
    "undecodable bytes": ("easyr1", {"problem": "<image>?", "answer": "1",
                                     "images": [{"bytes": b"\x89PNG not an image", "path": None}]},
                          "field 'images': cannot read image embedded image 1 (17 bytes)"),
    "missing prompt key": ("easyr1", {"problem": None, "answer": "1", "images": []},
                           "missing field 'problem' (set by data.prompt_key)"),
    "missing verl prompt": ("verl", {"reward_model": {"ground_truth": "1"}, "images": []},
                            "missing field 'prompt'"),
    "missing answer": ("verl", {"prompt": [{"role": "user", "content": "1+1?"}],
                                "reward_model": {"style": "rule"}},
                       "missing field 'reward_model.ground_truth' (required in this file)"),
    "bad llava turn": ("llava", {"conversations": [{"from": "robot", "value": "hi"}]},
                       "field 'conversations[0]': expected"),
    "bad base64": ("messages", {"messages": [{"role": "user", "content": "<image>?"}], "answer": "1",
                                "images": [{"bytes": "not base64!", "path": None}]},
                   "field 'images': image 1 is not valid base64"),
}


@pytest.mark.parametrize("case", ERRORS)
def test_a_bad_row_names_file_row_and_key(tmp_path, case):
    name, row, words = ERRORS[case]
    good = {"easyr1": easyr1_rows, "verl": verl_rows, "llava": llava_rows, "messages": trl_rows}[name]()[0]
    if name == "llava":  # its good row's image must exist
        (tmp_path / "img").mkdir()
        (tmp_path / "img" / "red.png").write_bytes(png(RED))
    # bytes go in Parquet, as those formats ship them
    write = write_parquet if name in ("easyr1", "verl") else write_jsonl
    path = write(tmp_path / f"rows.{'parquet' if name in ('easyr1', 'verl') else 'jsonl'}", [good, row])
    loader = RowLoader(path, require_answer=name != "llava")
    with pytest.raises(DataError) as caught:
        loader.load_all()
    assert f"{path}:2: " in str(caught.value) and words in str(caught.value)


def test_undecodable_parquet_bytes_name_the_row(tmp_path):
    rows = easyr1_rows()
    rows[1]["images"][1]["bytes"] = b"garbage"
    path = write_parquet(tmp_path / "rows.parquet", rows)
    with pytest.raises(DataError, match=r"rows.parquet:2: field 'images': cannot read image "
                                         r"embedded image 2 \(7 bytes\)"):
        RowLoader(path).load_all()


def test_embedded_images_follow_the_pixel_budget(tmp_path):
    rows = [{"problem": "<image>?", "answer": "1",
             "images": [{"bytes": png(RED, (600, 400)), "path": None}]}]
    path = write_parquet(tmp_path / "big.parquet", rows)
    loader = RowLoader(path, max_pixels=240 * 160)
    assert loader.load_all()[0].images[0].size == (240, 160) and loader.resized == 1
    with pytest.raises(DataError, match=r"big.parquet:1: field 'images': embedded image 1 .* has "
                                        r"600x400 = 240000 pixels"):
        RowLoader(path, max_pixels=240 * 160, oversize_images="reject").load_all()


def test_a_forced_format_that_does_not_fit_names_the_key(files):
    with pytest.raises(DataError, match=r"llava.jsonl:1: missing field 'problem' \(set by data.prompt_key\)"):
        RowLoader(files["llava"], row_format=RowFormat(name="easyr1")).load_all()


def test_the_data_keys_are_checked_with_the_config():
    with pytest.raises(ConfigError, match="data.prompt_template: must hold {problem}"):
        load_config(None, ["data.prompt_template=Answer briefly."])
    with pytest.raises(ConfigError, match="data.format"):
        load_config(None, ["data.format=alpaca"])
    with pytest.raises(ConfigError, match="data.image_key: must name a column"):
        load_config(None, ["data.image_key="])


# ----------------------------------------------------------------------------- the CLI

@pytest.mark.parametrize("name, fmt, rows", [("easyr1", "easyr1", 2), ("verl", "verl", 1),
                                             ("llava", "llava", 2), ("llava_json", "llava", 2),
                                             ("trl", "messages", 2)])
def test_data_check_names_the_format(files, capsys, name, fmt, rows):
    assert main(["data", "check", str(files[name])]) == 0
    assert f"format {fmt}, {rows} row(s) valid, 0 skipped" in capsys.readouterr().out


def test_data_check_names_a_bad_row_and_skips_it(tmp_path, capsys):
    rows = easyr1_rows()
    rows[0]["problem"] = "<image><image>Two?"
    path = write_parquet(tmp_path / "rows.parquet", rows)
    assert main(["data", "check", str(path)]) == 2
    assert f"{path}:1: field 'images': the messages have 2" in capsys.readouterr().err
    assert main(["data", "check", str(path), "--skip-bad-rows"]) == 0
    assert "format easyr1, 1 row(s) valid, 1 skipped" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["easyr1", "verl", "llava_json", "trl"])
def test_convert_round_trip(files, tmp_path, capsys, name):
    out = tmp_path / "converted"
    assert main(["data", "convert", str(files[name]), "--out", str(out)]) == 0
    converted = out / f"{files[name].stem}.jsonl"
    assert str(converted) in capsys.readouterr().out
    before, after = RowLoader(files[name]).load_all(), RowLoader(converted).load_all()
    assert [(e.messages, e.answer, e.extra) for e in after] == [(e.messages, e.answer, e.extra)
                                                                for e in before]
    assert [[i.tobytes() for i in e.images] for e in after] == [[i.tobytes() for i in e.images]
                                                                for e in before]
    assert main(["data", "convert", str(files[name]), "--out", str(out)]) == 0  # its own output


def test_convert_never_replaces_a_users_directory(files, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["data", "convert", str(files["easyr1"]), "--out", str(out)]) == 2
    assert "holds files kimivl-rl did not write" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    convert_file(RowLoader(files["easyr1"]), tmp_path / "fresh")
    (tmp_path / "fresh" / "geo3k.jsonl").write_text("edited by hand\n")
    with pytest.raises(Exception, match="did not write"):
        convert_file(RowLoader(files["easyr1"]), tmp_path / "fresh")


def test_build_long_cot_reads_an_easyr1_parquet_and_writes_its_images(files, tmp_path, monkeypatch):
    """Prompts with embedded images in another trainer's format need no conversion: each kept row
    gets its prompt's images, as the loader decoded them, as PNG files beside the output. (The
    teacher here answers by rule; tests/test_long_cot_builder.py samples a real one.)"""
    import kimivl_rl.system.actors
    from kimivl_rl.reward.contract import RewardInput, answer_only_reward
    from kimivl_rl.system.long_cot_builder import build_long_cot
    from test_long_cot_builder import sample

    trace = ("<think>First I will look. Let me check it. Wait, the shapes are clear. Let me try "
             "another way: {a}.</think>\\boxed{{{a}}}")

    def teacher(cfg, model_path, prompts, n, temperature, desc):
        samples = [[sample(trace.format(a=p.answer))] * n for p in prompts]
        scores = [answer_only_reward(RewardInput(s.text, p.answer)) for p, g in zip(prompts, samples) for s in g]
        yield prompts, samples, scores

    monkeypatch.setattr(kimivl_rl.system.actors, "sample_and_score", teacher)
    cfg = load_config(None, ["long_cot_builder.samples_per_prompt=1"])
    out = tmp_path / "out" / "cot.jsonl"
    stats = build_long_cot(cfg, "teacher", files["easyr1"], out)
    rows = RowLoader(out, require_answer=True).load_all()
    assert stats["totals"]["kept"] == 2 and [r.answer for r in rows] == ["30", "no"]
    assert [colours(r) for r in rows] == [colours(e) for e in RowLoader(files["easyr1"]).load_all()]
    assert sorted(stats["copied_images"]) == ["row000001_1.png", "row000002_1.png", "row000002_2.png"]


@pytest.mark.slow
def test_eval_reads_an_easyr1_parquet_as_it_is(tmp_path, tiny_model_dir):
    import subprocess
    import sys

    rows = [{"problem": "<image>What colour is the picture?", "answer": "red",
             "images": [{"bytes": png(RED, (56, 56)), "path": "0.png"}]},
            {"problem": "What is 2 + 2?", "answer": "4", "images": []}]
    path = write_parquet(tmp_path / "geo3k_test.parquet", rows)
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "kimivl_rl.cli", "eval", "configs/tiny.yaml", "--model",
         str(tiny_model_dir), "--file", str(path), "--out", str(report), "--samples", "0",
         f"output.dir={tmp_path / 'out'}", "rollout.max_new_tokens=16",
         "data.prompt_template={problem} Answer in \\boxed{}."],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reading rows as format 'easyr1'" in result.stderr
    written = json.loads(report.read_text())
    assert written["examples"] == 2
    # every prompt's greedy response, named by its row and scored as the report counts it
    responses = written["responses"]
    assert [(r["source"], r["reference"]) for r in responses] == \
        [(f"{path}:1", "red"), (f"{path}:2", "4")]
    assert sum(r["score"] for r in responses) / 2 == written["slices"]["all"]["greedy"]
    assert all(isinstance(r["response"], str) and r["tokens"] > 0 for r in responses)


def test_a_json_file_must_hold_a_list_of_rows(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps({"conversations": []}))
    with pytest.raises(DataError, match=r"rows.json: a .json data file must hold a list of rows, got dict"):
        RowLoader(path).load_all()


def test_difficulty_labels_keep_the_files_own_format(tmp_path, files):
    """``data label-difficulty`` writes each rated row back in its file's format: the Parquet
    table keeps its embedded images and gains pass_rate, JSONL rows keep their keys; a row the
    loader skipped is left out; the rates read back through the loader."""
    from kimivl_rl.data.rows import row_number
    from kimivl_rl.system.difficulty import write_labelled

    cases = (("easyr1", {1: 0.25, 2: 1.0}), ("verl", {1: 0.5}), ("llava", {2: 0.0}), ("trl", {1: 0.5, 2: 0.125}),
             ("llava_json", {1: 0.75}))
    for name, rates in cases:
        source = files[name]
        out = source.with_name(f"labelled_{name}{source.suffix}")
        write_labelled(source, out, rates)
        examples = RowLoader(out).load_all()
        assert [e.pass_rate for e in examples] == list(rates.values()), name
        kept = [e for e in RowLoader(source).load_all() if row_number(e.source) in rates]
        assert [colours(e) for e in kept] == [colours(e) for e in examples], name
        assert [e.messages for e in kept] == [e.messages for e in examples], name
    assert pq.read_table(files["easyr1"].with_name("labelled_easyr1.parquet")).column_names == [
        "problem", "answer", "images", "pass_rate"]


def cli_in(tmp_path: Path, tiny_model_dir, command: list[str], *args: str) -> str:
    """``kimivl-rl COMMAND`` on the tiny config with ``tmp_path`` as data directory; its stderr."""
    import subprocess
    import sys

    common = ["configs/tiny.yaml", "--model", str(tiny_model_dir), f"model.path={tiny_model_dir}",
              "model.init_if_missing=false", f"data.dir={tmp_path}",
              "data.build_if_missing=false", f"output.dir={tmp_path / 'out'}",
              "rollout.max_new_tokens=12", "rollout.gpu_memory_utilization=0.1"]
    done = subprocess.run([sys.executable, "-m", "kimivl_rl.cli", *command, *common, *args],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def one_short_rl_iteration(tmp_path: Path, tiny_model_dir, *keys: str) -> str:
    """One RL iteration of 2 prompts x 2 samples on the given files; all 4 responses trained."""
    log = cli_in(tmp_path, tiny_model_dir, ["rl"], *keys, "rl.iterations=1", "rl.prompts_per_iteration=2",
           "rl.samples_per_prompt=2", "rl.eval_prompts=2", "rl.drop_zero_advantage_groups=false",
           "rl.dynamic_sampling_rounds=0", "eval.samples=0")
    trained = [json.loads(line) for line in (tmp_path / "out" / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [r["learner_responses"] for r in trained if "learner_responses" in r] == [4]
    return log


@pytest.mark.slow
def test_rl_labels_and_trains_on_a_geometry3k_shaped_parquet_as_it_is(tmp_path, tiny_model_dir):
    """EasyR1's geometry3k shape (``problem`` with ``<image>``, ``answer``, embedded images) end
    to end, without conversion: ``data label-difficulty`` writes a labelled Parquet beside it,
    and ``rl`` trains one iteration on that file with a verl-shaped evaluation file."""
    colours = {"red": RED, "blue": BLUE}
    train = [{"problem": f"<image>Which colour fills the picture? ({i})", "answer": name,
              "images": [{"bytes": png(rgb, (56, 56)), "path": f"{i}.png"}]}
             for i, (name, rgb) in enumerate(list(colours.items()) * 3)]
    write_parquet(tmp_path / "geo3k_train.parquet", train)
    write_parquet(tmp_path / "verl_test.parquet", verl_rows() * 2)
    template = "data.prompt_template={problem} Answer in \\boxed{}."
    log = cli_in(tmp_path, tiny_model_dir, ["data", "label-difficulty"], template, "--input",
                 str(tmp_path / "geo3k_train.parquet"), "sampler.label_samples=2")
    assert "reading rows as format 'easyr1'" in log
    labelled = RowLoader(tmp_path / "geo3k_train.labelled.parquet", require_answer=True).load_all()
    assert len(labelled) == 6 and all(e.pass_rate in (0.0, 0.5, 1.0) for e in labelled)
    one_short_rl_iteration(tmp_path, tiny_model_dir, template, "rl.train_file=geo3k_train.labelled.parquet",
                           "rl.eval_file=verl_test.parquet")


def colour_prompts(tmp_path: Path, name: str) -> str:
    """Four colour prompts in the shape of ``name`` (LLaVA: image paths and no answer field;
    verl: embedded images and ``reward_model.ground_truth``); the file's name."""
    prompt = "Which colour fills the picture? Answer in \\boxed{}."
    pairs = [("red", RED), ("blue", BLUE)] * 2
    if name == "verl":
        write_parquet(tmp_path / "verl.parquet", [
            {"prompt": [{"role": "user", "content": f"<image>{prompt}"}], "data_source": "colours",
             "images": [{"bytes": png(rgb, (56, 56))}], "reward_model": {"ground_truth": colour}}
            for colour, rgb in pairs])
        return "verl.parquet"
    (tmp_path / "img").mkdir()
    for i, (_, rgb) in enumerate(pairs):
        (tmp_path / "img" / f"{i}.png").write_bytes(png(rgb, (56, 56)))
    write_jsonl(tmp_path / "llava.jsonl", [
        {"id": f"c{i}", "image": f"img/{i}.png", "conversations": [
            {"from": "human", "value": f"<image>\n{prompt}"}, {"from": "gpt", "value": f"\\boxed{{{colour}}}"}]}
        for i, (colour, _) in enumerate(pairs)])
    return "llava.jsonl"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llava", "verl"])
def test_rl_trains_on_a_foreign_file_as_it_is(tmp_path, tiny_model_dir, name):
    """A LLaVA-shaped JSONL (the last ``gpt`` turn is each row's reference) and a verl-shaped
    Parquet, each as RL prompts and evaluation file of one RL iteration."""
    file = colour_prompts(tmp_path, name)
    log = one_short_rl_iteration(tmp_path, tiny_model_dir, f"rl.train_file={file}", f"rl.eval_file={file}")
    assert f"{file}: reading rows as format '{name}'" in log

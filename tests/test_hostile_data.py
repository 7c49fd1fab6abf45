"""Hostile data and configs: every one stops with an error naming the file and line (or key)
before training starts, or with ``bad_rows=skip`` is a counted skip; a failed start leaves the
output directory exactly as it was.

tests/test_rows.py and tests/test_config.py hold the common cases; these are the nastier ones.
"""
from __future__ import annotations

import codecs
import json
import os
import re
import struct
import textwrap
import time
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from kimivl_rl.config import ConfigError, load_config
from kimivl_rl.config.loader import MAX_YAML_VALUES
from kimivl_rl.data.rows import DataError, RowLoader
from kimivl_rl.prepare import check_data, stage_data_files

IMAGE_MSG = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many?"}]},
             {"role": "assistant", "content": "\\boxed{2}"}]
TEXT_MSG = [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "\\boxed{2}"}]
GOOD = {"messages": IMAGE_MSG, "images": ["img/a.png"], "answer": "2"}


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG header announcing width x height, with (almost) no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b""))
            + chunk(b"IEND", b""))


@pytest.fixture
def data_dir(tmp_path) -> Path:
    """tmp/data (the data directory) and tmp/outside (a directory it must not reach)."""
    data, outside = tmp_path / "data", tmp_path / "outside"
    (data / "img").mkdir(parents=True)
    outside.mkdir()
    Image.new("RGB", (56, 56), (255, 0, 0)).save(data / "img" / "a.png")
    Image.new("RGB", (56, 56), (0, 255, 0)).save(outside / "secret.png")
    (data / "img" / "bomb.png").write_bytes(png_header_only(30_000, 30_000))
    (data / "img" / "empty.png").write_bytes(b"")
    (data / "img" / "inside_link.png").symlink_to(data / "img" / "a.png")
    (data / "img" / "outside_link.png").symlink_to(outside / "secret.png")
    (data / "linked_dir").symlink_to(outside, target_is_directory=True)
    return data


def write_lines(directory: Path, *lines: str | bytes, name: str = "rows.jsonl",
                final_newline: bool = True) -> Path:
    path = directory / name
    encoded = [line if isinstance(line, bytes) else line.encode() for line in lines]
    path.write_bytes(b"\n".join(encoded) + (b"\n" if final_newline else b""))
    return path


def row(**changes) -> str:
    return json.dumps({**GOOD, **changes}, ensure_ascii=False)


# ----------------------------------------------------------------------------- bad rows

CASES = {
    # JSON that is not a row
    "nested too deeply": ("[" * 100_000, "malformed JSON: nested too deeply"),
    "integer too long": ('{"answer": ' + "9" * 5000 + "}", "malformed JSON: Exceeds the limit"),
    "NUL bytes": (b'{"messages": "\x00"}', "NUL bytes: not UTF-8 text"),
    "latin-1 line": (row(answer="caf\u00e9").encode("latin-1"), "not UTF-8 text"),
    # wrong field types
    "answer is an object": (row(answer={"value": 2}), "field 'answer' must be a string or a finite number"),
    "answer is a boolean": (row(answer=True), "field 'answer' must be a string or a finite number"),
    "answer is NaN": (row(answer="X").replace('"X"', "NaN"), "field 'answer' must be a string or a finite"),
    "difficulty is NaN": (row(difficulty="X").replace('"X"', "NaN"), "field 'difficulty' must be a finite number"),
    "pass rate is infinite": (row(pass_rate="X").replace('"X"', "Infinity"),
                              "field 'pass_rate' must be a finite number"),
    "difficulty too large for a float": (row(difficulty=10**400), "field 'difficulty' must be a finite number"),
    "difficulty is a boolean": (row(difficulty=True), "field 'difficulty' must be a number"),
    "reasoning is not a string": (row(messages=[IMAGE_MSG[0], {**IMAGE_MSG[1], "reasoning_content": 5}]),
                                  "field 'messages[1]': 'reasoning_content' must be a string"),
    "message without content": (row(messages=[{"role": "user"}], images=[]),
                                "field 'messages[0]': 'content' must be a string or a list of parts"),
    "message is a string": (row(messages=["hi"], images=[]), "field 'messages[0]' must be an object"),
    "messages empty": (row(messages=[], images=[]), "field 'messages' must be a non-empty list"),
    "messages a broken JSON string": (row(messages="[{"), "field 'messages': malformed JSON string"),
    "image path not a string": (row(images=[3]), "field 'images' must be a list of paths"),
    "text part without text": (row(messages=[{"role": "user", "content": [{"type": "text"}]}], images=[]),
                               "field 'messages[0]'.content[0]"),
    # placeholders against images
    "two placeholders, one image": (row(messages=[{"role": "user", "content": [
        {"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}]}]),
        "2 image placeholder(s) but the row lists 1 image(s)"),
    "an image without a placeholder": (row(messages=TEXT_MSG),
                                       "0 image placeholder(s) but the row lists 1 image(s)"),
    # paths that escape the data directory
    "parent of parent": (row(images=["../../etc/passwd"]), "points outside the data directory"),
    "up and out to a real image": (row(images=["img/../../outside/secret.png"]),
                                   "points outside the data directory"),
    "absolute path to a real image": ("ABSOLUTE", "points outside the data directory"),
    "symlink to an image outside": (row(images=["img/outside_link.png"]),
                                    "points outside the data directory"),
    "through a symlinked directory": (row(images=["linked_dir/secret.png"]),
                                      "points outside the data directory"),
    "NUL byte in the path": (row(images=["img/a\u0000.png"]), "field 'images': bad path"),
    "path too long for the system": (row(images=["x" * 5000]), "field 'images': bad path"),
    # images that are not images
    "a directory": (row(images=["img"]), "image file not found"),
    "empty image file": (row(images=["img/empty.png"]), "cannot read image"),
    "decompression bomb": (row(images=["img/bomb.png"]), "cannot read image"),
    "a text file": (row(images=["rows.jsonl"]), "cannot read image"),
}


def case_line(data_dir: Path, case: str) -> str | bytes:
    line = CASES[case][0]
    if line == "ABSOLUTE":
        return row(images=[str(data_dir.parent / "outside" / "secret.png")])
    return line


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_row_names_file_line_and_field(data_dir, case):
    path = write_lines(data_dir, row(), "", case_line(data_dir, case), row())  # bad row: line 3
    with pytest.raises(DataError) as err:
        RowLoader(path, require_answer=True).load_all()
    message = str(err.value)
    assert message.startswith(f"{path}:3: ")
    assert CASES[case][1] in message
    assert len(message) < 1000  # the row itself can be megabytes


def test_skip_mode_counts_every_hostile_row(data_dir):
    lines = [case_line(data_dir, case) for case in sorted(CASES)]
    path = write_lines(data_dir, row(), *lines, row(images=["img/inside_link.png"]))
    loader = RowLoader(path, require_answer=True, bad_rows="skip")
    rows = loader.load_all()
    assert [r.source for r in rows] == [f"{path}:1", f"{path}:{len(CASES) + 2}"]
    assert loader.skipped == len(CASES)
    # A symlink that stays inside the data directory is fine.
    assert rows[1].images[0].getpixel((0, 0)) == (255, 0, 0)


def test_a_huge_bad_value_is_quoted_short(data_dir):
    path = write_lines(data_dir, json.dumps({"messages": [{"role": "x" * 1_000_000, "content": "hi"}]}))
    with pytest.raises(DataError, match=r"rows.jsonl:1: field 'messages\[0\]': 'role' must be") as err:
        RowLoader(path).load_all()
    assert len(str(err.value)) < 1000 and "1000002 characters" in str(err.value)


# ----------------------------------------------------------------------------- whole files

def test_truncated_jsonl_names_the_cut_line(data_dir):
    cut = row()[:25]
    path = write_lines(data_dir, row(), row(), row(), cut, final_newline=False)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:4: malformed JSON"):
        RowLoader(path).load_all()
    loader = RowLoader(path, bad_rows="skip")
    assert len(loader.load_all()) == 3 and loader.skipped == 1


@pytest.mark.parametrize("encoding, words", [
    ("utf-16", "the file is UTF-16 text (byte-order mark); data files must be UTF-8"),
    ("utf-16-be", "NUL bytes: not UTF-8 text"),
    ("utf-32", "the file is UTF-32 text (byte-order mark)"),
    ("latin-1", "not UTF-8 text (invalid continuation byte at byte"),
])
def test_files_in_other_encodings(data_dir, encoding, words):
    text = row(messages=TEXT_MSG, images=[], answer="caf\u00e9 2") + "\n"
    path = data_dir / "rows.jsonl"
    path.write_bytes(text.encode(encoding))
    with pytest.raises(DataError) as err:
        RowLoader(path).load_all()
    assert str(err.value).startswith(f"{path}:1: ") and words in str(err.value)


def test_a_utf8_byte_order_mark_is_accepted(data_dir):
    path = data_dir / "rows.jsonl"
    path.write_bytes(codecs.BOM_UTF8 + (row() + "\n" + row(answer="3") + "\n").encode())
    assert [r.answer for r in RowLoader(path).load_all()] == ["2", "3"]


@pytest.mark.parametrize("damage", ["truncated", "not parquet"])
def test_damaged_parquet_names_the_file(data_dir, damage):
    path = data_dir / "rows.parquet"
    pq.write_table(pa.Table.from_pylist([{"messages": json.dumps(IMAGE_MSG), "images": ["img/a.png"],
                                          "answer": "2"}] * 50), path)
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2] if damage == "truncated" else b"PAR1 nope")
    for policy in ("error", "skip"):  # a damaged file cannot be skipped past
        with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: not a readable Parquet file"):
            RowLoader(path, bad_rows=policy).load_all()


# ----------------------------------------------------------------------------- hostile configs

def write_config(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "cfg.yaml"
    if isinstance(text, str):
        text = textwrap.dedent(text).encode()
    path.write_bytes(text)
    return path


@pytest.mark.parametrize("text, located, words", [
    ("rl:\n  iterations: 3\n  lr: 1.0e-4\n  iterations: 5\n", ":4: rl.iterations:",
     "duplicate key (first set on line 2)"),
    ("rl:\n  lr: 1.0e-4\nrl:\n  tau: 0.2\n", ":3: rl:", "duplicate key (first set on line 1)"),
    ("model:\n  path: !!python/object/apply:os.system ['echo pwned']\n", ":2: model.path:",
     "not a plain YAML value: tag 'tag:yaml.org,2002:python/object/apply:os.system'"),
    ("model:\n  path: !!python/name:os.system\n", ":2: model.path:",
     "not a plain YAML value: could not determine a constructor"),
    ("rl: !!python/object:argparse.Namespace {lr: 1}\n", ":1: rl:", "not a plain YAML value: tag"),
    ("rl:\n  lr: .nan\n", ":2: rl.lr:", "expected a finite number"),
    ("rl:\n  tau: .inf\n", ":2: rl.tau:", "expected a finite number"),
    ("reward:\n  timeout_s: 1e999\n", ":2: reward.timeout_s:", "expected a finite number"),
    ("rollout:\n  top_p: -.inf\n", ":2: rollout.top_p:", "expected a finite number"),
    ("sft:\n  joint:\n    phases:\n      - {max_seq_len: 64}\n      - {lr_peek: 1.0e-3}\n",
     ":5: sft.joint.phases.1.lr_peek:", "did you mean 'lr_peak'"),
    ("sft:\n  joint:\n    phases:\n      - max_seq_len: 64\n        epochs: two\n",
     ":5: sft.joint.phases.0.epochs:", "expected float, got str 'two'"),
    ("rl:\n  1: 2\n", ":2: rl.1:", "unknown key '1'"),
    ("data:\n  dir: [a, b]\n", ":2: data.dir:", "expected str, got list"),
    ("cluster:\n  bind_host: 127.0.0.1\n  use_gpu: 1\n", ":3: cluster.use_gpu:", "expected bool"),
])
def test_hostile_config_names_file_line_and_key(tmp_path, text, located, words):
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"{path}{located}" in str(err.value) and words in str(err.value)


def test_alias_bomb_stops_quickly(tmp_path):
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    path = write_config(tmp_path, "\n".join(levels) + "\n")  # 9**9 values once expanded
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}:\d+: .*more than {MAX_YAML_VALUES} values"):
        load_config(path)
    assert time.perf_counter() - start < 30  # unbounded expansion would not end at all


@pytest.mark.parametrize("content, words", [
    ("rl:\n  iterations: 3\n# caf\u00e9\n".encode("latin-1"), ":3: not UTF-8 text"),
    ("rl:\n  iterations: 3\n".encode("utf-16"), ":1: not UTF-8 text"),
    (bytes(range(128, 256)) * 4, ":1: not UTF-8 text"),
    (b"- rl\n- model\n", ":1: the top level must be a mapping"),
])
def test_config_files_that_are_not_yaml_mappings(tmp_path, content, words):
    path = write_config(tmp_path, content)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"{path}{words}" in str(err.value)


@pytest.mark.parametrize("override", ["rl.lr=.nan", "rl.tau=inf", "reward.timeout_s=1e999"])
def test_non_finite_overrides_are_named(override):
    with pytest.raises(ConfigError, match=rf"command-line override '{re.escape(override)}'.*finite number"):
        load_config(None, [override])


# ----------------------------------------------------------------------------- before training

def good_data(root: Path) -> Path:
    """A tiny data set with every file the default config names (all rows valid)."""
    for name in ("joint_sft/train.jsonl", "long_cot/train.jsonl", "rl/train.jsonl", "rl/eval.jsonl",
                 "joint_sft/eval.jsonl", "long_cot/eval.jsonl"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(row(messages=TEXT_MSG, images=[]) + "\n")
    return root


def test_stage_data_files_follow_the_config():
    cfg = load_config(None, ["data.dir=/d", "sft.joint.eval_file=rl/eval.jsonl"])
    assert stage_data_files(cfg, "joint") == [(Path("/d/joint_sft/train.jsonl"), False),
                                              (Path("/d/rl/eval.jsonl"), True)]
    assert stage_data_files(cfg, "rl") == [(Path("/d/rl/train.jsonl"), True),
                                           (Path("/d/rl/eval.jsonl"), True)]
    replaying = load_config(None, ["data.dir=/d", "sft.long_cot.replay_file=joint_sft/train.jsonl"])
    assert stage_data_files(replaying, "long_cot") == [(Path("/d/long_cot/train.jsonl"), False),
                                                       (Path("/d/joint_sft/train.jsonl"), False),
                                                       (Path("/d/long_cot/eval.jsonl"), True)]
    with pytest.raises(ValueError, match="unknown stage 'ppo'"):
        stage_data_files(cfg, "ppo")


def test_check_data_reads_every_file_of_the_stages_asked_for(tmp_path):
    data = good_data(tmp_path / "data")
    (data / "rl/train.jsonl").write_text(row(messages=TEXT_MSG, images=[]) + "\n{broken\n")
    cfg = load_config(None, [f"data.dir={data}"])
    report = check_data(cfg, ["joint", "long_cot"])  # the broken RL file is not theirs
    counts = {"rows": 1, "skipped": 0, "resized": 0, "images": 0}
    assert report == {str(data / name): counts for name in
                      ("joint_sft/train.jsonl", "joint_sft/eval.jsonl", "long_cot/train.jsonl",
                       "long_cot/eval.jsonl")}
    with pytest.raises(DataError, match=rf"^{re.escape(str(data))}/rl/train.jsonl:2: malformed JSON"):
        check_data(cfg)
    skipping = load_config(None, [f"data.dir={data}", "data.bad_rows=skip"])
    assert check_data(skipping, ["rl"])[str(data / "rl/train.jsonl")] == {**counts, "skipped": 1}
    good_data(data)
    (data / "rl/eval.jsonl").unlink()
    with pytest.raises(DataError, match=rf"^{re.escape(str(data))}/rl/eval.jsonl: data file not found"):
        check_data(cfg, ["rl"])


def snapshot(directory: Path) -> dict[str, tuple]:
    """Every file (content, mtime) and directory under ``directory``."""
    out: dict[str, tuple] = {}
    for path in sorted(directory.rglob("*")):
        key = str(path.relative_to(directory))
        out[key] = ("dir",) if path.is_dir() else (path.read_bytes(), path.stat().st_mtime_ns)
    return out


@pytest.fixture
def previous_output(tmp_path) -> Path:
    """An output directory holding the results of an earlier run."""
    out = tmp_path / "out"
    files = {"config.yaml": b"rl:\n  iterations: 3\n",
             "sft_joint/metrics.jsonl": b'{"step": 1, "loss": 2.5}\n',
             "sft_joint/ray_train/checkpoint_000001/model.safetensors": os.urandom(4096),
             "sft_long_cot/metrics.jsonl": b'{"step": 7, "loss": 0.5}\n',
             "rl/summary.json": json.dumps({"iterations": 3}).encode(),
             "rl/checkpoints/iter_000003/learner.safetensors": os.urandom(2048),
             "tensorboard/events.out": os.urandom(512)}
    for name, content in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(content)
    return out


@pytest.fixture
def no_ray(monkeypatch):
    """Starting Ray is what a failed start must never get to."""
    import kimivl_rl.system.controller
    import kimivl_rl.sft.trainer

    def refuse(cfg):
        raise AssertionError("Ray was started although the data is bad")
    monkeypatch.setattr(kimivl_rl.sft.trainer, "init_ray", refuse)
    monkeypatch.setattr(kimivl_rl.system.controller, "init_ray", refuse)


def cli_config(tmp_path: Path, data: Path, out: Path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(f"model:\n  path: {tmp_path}/no-model\n  init_if_missing: false\n"
                    f"  family: qwen2_5_vl\n"
                    f"data:\n  dir: {data}\n  build_if_missing: false\n"
                    f"output:\n  dir: {out}\nrl:\n  iterations: 5\n")
    return path


@pytest.mark.parametrize("argv, bad_file", [
    (["sft", "--stage", "joint"], "joint_sft/train.jsonl"),
    (["sft", "--stage", "long_cot"], "long_cot/train.jsonl"),
    (["run"], "rl/train.jsonl"),  # all stages are checked before the first one starts
])
def test_a_failed_start_names_the_row_and_leaves_the_output_untouched(
        tmp_path, capsys, previous_output, no_ray, argv, bad_file):
    from kimivl_rl import cli

    data = good_data(tmp_path / "data")
    with open(data / bad_file, "a") as f:
        f.write(row(images=["../../../etc/passwd"]) + "\n")  # line 2
    config = cli_config(tmp_path, data, previous_output)
    before = snapshot(previous_output)
    assert cli.main([argv[0], str(config), *argv[1:]]) == 2
    err = capsys.readouterr().err
    assert f"kimivl-rl: error: {data / bad_file}:2: field 'images'" in err
    assert "points outside the data directory" in err and "Traceback" not in err
    assert snapshot(previous_output) == before


@pytest.mark.parametrize("argv, file", [
    (["sft", "--stage", "joint"], "joint_sft/train.jsonl"),
    (["sft", "--stage", "long_cot"], "long_cot/eval.jsonl"),
    (["rl"], "rl/eval.jsonl"),
    (["run"], "rl/train.jsonl"),
])
def test_a_row_over_an_explicit_image_limit_stops_the_start(tmp_path, capsys, previous_output,
                                                           no_ray, argv, file):
    from kimivl_rl import cli

    data = good_data(tmp_path / "data")
    Image.new("RGB", (56, 56), (255, 0, 0)).save((data / file).with_name("a.png"))
    question = {"role": "user", "content": [{"type": "image"}, *IMAGE_MSG[0]["content"]]}
    with open(data / file, "a") as f:
        f.write(row(messages=[question, IMAGE_MSG[1]], images=["a.png", "a.png"]) + "\n")  # line 2
    config = cli_config(tmp_path, data, previous_output)
    before = snapshot(previous_output)
    assert cli.main([argv[0], str(config), *argv[1:], "rollout.max_images_per_prompt=1"]) == 2
    err = capsys.readouterr().err
    assert (f"kimivl-rl: error: rollout.max_images_per_prompt: {data / file}:2 has 2 images, over "
            f"the limit of 1") in err and "Traceback" not in err
    assert snapshot(previous_output) == before


def test_a_failed_rl_start_leaves_the_output_untouched(tmp_path, capsys, previous_output, no_ray):
    from kimivl_rl import cli

    data = good_data(tmp_path / "data")
    with open(data / "rl/train.jsonl", "a") as f:
        f.write("{cut mid-obj\n")
    before = snapshot(previous_output)
    assert cli.main(["rl", str(cli_config(tmp_path, data, previous_output))]) == 2
    assert f"{data / 'rl/train.jsonl'}:2: malformed JSON" in capsys.readouterr().err
    assert snapshot(previous_output) == before


def test_a_missing_model_path_is_named_before_the_output_is_touched(tmp_path, capsys, previous_output,
                                                                     no_ray):
    from kimivl_rl import cli

    missing = tmp_path / "runs" / "demo" / "out" / "sft_long_cot" / "model"
    config = cli_config(tmp_path, good_data(tmp_path / "data"), previous_output)
    before = snapshot(previous_output)
    for argv in (["rl"], ["sft", "--stage", "long_cot"]):
        assert cli.main([*argv, "--model", str(missing), str(config)]) == 2
        err = capsys.readouterr().err
        assert f"kimivl-rl: error: --model {missing}: no such file or directory" in err
        assert "Traceback" not in err and snapshot(previous_output) == before
    # what can be a hub id passes through; a relative path with folders cannot be one
    assert cli.checked_model_argument("configs") == str(Path("configs").resolve())
    assert cli.checked_model_argument("org/name") == "org/name"
    assert cli.checked_model_argument("name") == "name"
    for local in ("runs/nowhere/model", "./nowhere", "~/nowhere"):
        with pytest.raises(cli.ConfigError, match="no such file or directory"):
            cli.checked_model_argument(local)

"""The row loader: every kind of bad row is reported with file:line and the field."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from kimivl_rl.data.rows import DataError, RowLoader

IMAGE_MSG = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many?"}]},
             {"role": "assistant", "content": "\\boxed{2}"}]
GOOD = {"messages": IMAGE_MSG, "images": ["img/a.png"], "answer": "2"}


@pytest.fixture
def data_dir(tmp_path) -> Path:
    (tmp_path / "img").mkdir()
    Image.new("RGB", (56, 56), (255, 0, 0)).save(tmp_path / "img" / "a.png")
    Image.new("RGB", (600, 400), (0, 0, 255)).save(tmp_path / "img" / "big.png")
    (tmp_path / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
    Image.new("RGB", (56, 56)).save(tmp_path / "img" / "full.png")
    full = (tmp_path / "img" / "full.png").read_bytes()
    (tmp_path / "img" / "truncated.png").write_bytes(full[: len(full) // 2])
    return tmp_path


def write_lines(data_dir: Path, *lines: str | bytes) -> Path:
    path = data_dir / "rows.jsonl"
    with open(path, "wb") as f:
        for line in lines:
            f.write((line if isinstance(line, bytes) else line.encode()) + b"\n")
    return path


def bad(row: dict) -> str:
    return json.dumps(row)


def with_(**changes) -> str:
    return bad({**GOOD, **changes})


CASES = {
    "malformed json": ('{"messages": [', "malformed JSON"),
    "not utf-8": (b'{"messages": "\xff\xfe"}', "not UTF-8"),
    "not an object": ("[1, 2]", "must be a JSON object"),
    "missing messages": (bad({"images": [], "answer": "1"}), "missing field 'messages'"),
    "missing answer": (with_(answer=None), "missing field 'answer'"),
    "empty answer": (with_(answer="  "), "missing field 'answer'"),
    "bad role": (with_(messages=[{"role": "robot", "content": "x"}], images=[]), "'role' must be one of"),
    "bad part": (with_(messages=[{"role": "user", "content": [{"type": "audio"}]}], images=[]),
                 "field 'messages[0]'.content[0]"),
    "more images than placeholders": (with_(images=["img/a.png", "img/a.png"]),
                                      "1 image placeholder(s) but the row lists 2 image(s)"),
    "fewer images than placeholders": (with_(images=[]), "1 image placeholder(s) but the row lists 0"),
    "missing image": (with_(images=["img/nope.png"]), "image file not found"),
    "corrupt image": (with_(images=["img/corrupt.png"]), "cannot read image"),
    "truncated image": (with_(images=["img/truncated.png"]), "cannot read image"),
    "escaping path": (with_(images=["../outside.png"]), "points outside the data directory"),
    "absolute path": (with_(images=["/etc/passwd"]), "points outside the data directory"),
    "images not a list": (with_(images="img/a.png"), "field 'images' must be a list"),
    "bad difficulty": (with_(difficulty="hard"), "field 'difficulty' must be a number"),
    "pass rate out of range": (with_(pass_rate=1.5), "field 'pass_rate' must be in [0.0, 1.0]"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_row_names_file_line_and_field(data_dir, case):
    line, words = CASES[case]
    path = write_lines(data_dir, with_(), "", line)  # the bad row is on line 3
    with pytest.raises(DataError) as err:
        RowLoader(path, require_answer=True).load_all()
    assert f"{path}:3: " in str(err.value)
    assert words in str(err.value)


def test_skip_mode_counts_bad_rows_and_keeps_good_ones(data_dir, caplog):
    path = write_lines(data_dir, with_(), *(line for line, _ in CASES.values()), with_())
    loader = RowLoader(path, require_answer=True, bad_rows="skip")
    rows = loader.load_all()
    assert [r.source for r in rows] == [f"{path}:1", f"{path}:{len(CASES) + 2}"]
    assert loader.skipped == len(CASES)
    assert f"skipped {len(CASES)} bad row(s)" in caplog.text


def test_oversize_images_are_resized_or_rejected(data_dir):
    path = write_lines(data_dir, with_(images=["img/big.png"]))
    (row,) = RowLoader(path, max_pixels=240 * 160).load_all()
    assert row.images[0].size == (240, 160)
    with pytest.raises(DataError, match=r"rows.jsonl:1: field 'images': .*600x400 = 240000 pixels"):
        RowLoader(path, max_pixels=240 * 160, oversize_images="reject").load_all()


def test_good_row_fields(data_dir):
    path = write_lines(data_dir, with_(difficulty=3, pass_rate=0.25, task="count"))
    (row,) = RowLoader(path, require_answer=True).load_all()
    assert row.answer == "2" and row.difficulty == 3.0 and row.pass_rate == 0.25
    assert row.images[0].size == (56, 56) and row.images[0].mode == "RGB"
    assert row.extra == {"task": "count"}


def test_parquet_rows_are_numbered(data_dir):
    chat = json.dumps(IMAGE_MSG)  # mixed-type chat parts travel as a JSON string
    table = pa.Table.from_pylist([
        {"messages": chat, "images": ["img/a.png"], "answer": "2"},
        {"messages": chat, "images": ["img/nope.png"], "answer": "2"},
    ])
    path = data_dir / "rows.parquet"
    pq.write_table(table, path)
    with pytest.raises(DataError, match=r"rows.parquet:2: field 'images': image file not found"):
        RowLoader(path).load_all()
    (first,) = RowLoader(path, bad_rows="skip").load_all()
    assert first.messages == IMAGE_MSG and first.source == f"{path}:1"


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        RowLoader(tmp_path / "absent.jsonl").load_all()


def test_loader_follows_the_configs_data_section(data_dir):
    from kimivl_rl.config.schema import DataConfig

    path = write_lines(data_dir, with_(images=["img/big.png"]), '{"broken": ')
    strict = RowLoader.for_config(path, DataConfig(max_pixels=240 * 160, oversize_images="reject"))
    with pytest.raises(DataError, match="over the budget"):
        strict.load_all()
    lenient = RowLoader.for_config(path, DataConfig(max_pixels=240 * 160, bad_rows="skip"))
    (row,) = lenient.load_all()
    assert row.images[0].size == (240, 160) and lenient.skipped == 1

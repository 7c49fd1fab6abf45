"""``kimivl-rl data convert``: a data file of any format the loader reads, written in the
project's own format (a JSONL file and its images as PNG files beside it) to see or edit."""
from __future__ import annotations

import json
from pathlib import Path

from kimivl_rl.data.build import write_with_manifest
from kimivl_rl.data.errors import DataError
from kimivl_rl.data.rows import Example, RowLoader

IMAGES_DIR = "images"


def example_row(example: Example, image_paths: list[str]) -> dict:
    """An example as a row of the project's format, its images at ``image_paths``."""
    known = {"messages": example.messages, "images": image_paths, "answer": example.answer,
             "difficulty": example.difficulty, "pass_rate": example.pass_rate}
    return {**example.extra, **{k: v for k, v in known.items() if v is not None}}


def _row_line(example: Example, image_paths: list[str]) -> str:
    try:
        return json.dumps(example_row(example, image_paths), ensure_ascii=False) + "\n"
    except (TypeError, ValueError) as exc:  # e.g. bytes in an extra column
        raise DataError(f"{example.source}: cannot be written as JSON: {exc}") from None


def _write_rows(loader: RowLoader, directory: Path) -> dict:
    """The loader's examples as ``<stem>.jsonl`` and ``images/`` in ``directory``; a summary."""
    (directory / IMAGES_DIR).mkdir()
    rows = 0
    with open(directory / f"{loader.path.stem}.jsonl", "x", encoding="utf-8") as f:
        for rows, example in enumerate(loader, start=1):
            paths = [f"{IMAGES_DIR}/{rows:06d}_{i}.png" for i in range(1, len(example.images) + 1)]
            for image, path in zip(example.images, paths):
                image.save(directory / path)
            f.write(_row_line(example, paths))
    return {"converted_from": str(loader.path.resolve()), "format": loader.format, "rows": rows,
            "skipped": loader.skipped, "resized": loader.resized}


def convert_file(loader: RowLoader, out_dir: str | Path) -> dict:
    """Write the loader's file into ``out_dir`` (new, empty, or an earlier output of ours);
    return what it wrote (the manifest, and the rows file's path)."""
    out_dir = Path(out_dir)
    manifest = write_with_manifest(out_dir, lambda directory: _write_rows(loader, directory),
                                   "--out", "Name a new or empty directory.")
    return {**manifest, "file": str(out_dir / f"{loader.path.stem}.jsonl")}

"""The data format for users' own data, and a streaming loader that checks every row.

A row (one JSON object per line of a ``.jsonl`` file, or one row of a ``.parquet`` file)::

    {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "..."}]},
                  {"role": "assistant", "reasoning_content": "optional thinking", "content": "..."}],
     "images": ["images/0001.png"],       # relative to the data file, inside its directory
     "answer": "3",                       # required for RL and evaluation files
     "difficulty": 2, "pass_rate": 0.4}   # optional

In Parquet files ``messages`` may also be a JSON string of that list (chat parts of mixed types
do not fit one Arrow type). ``content`` is a string or a list of parts (``{"type": "text", "text": ...}`` or
``{"type": "image"}``); the n-th image part takes ``images[n]``. Any problem raises
``DataError`` naming ``file:line`` and the field, unless the caller asked to skip bad rows, in
which case the loader counts them (``RowLoader.skipped``) and says so.

Rows shaped as EasyR1's, verl's, LLaVA's or TRL's are read too (``formats.py``; ``data.format``
picks one or ``auto`` detects it per file), and ``.json`` files holding a list of rows. An image
is a path, or embedded: bytes, a ``{"bytes": ..., "path": ...}`` struct (bytes as base64 in
JSON), a ``data:image/...;base64,`` URI or a bare base64 string; all are checked alike.
"""
from __future__ import annotations

import codecs
import io
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal, Optional

from PIL import Image, UnidentifiedImageError

from kimivl_rl.data.errors import DataError, short
from kimivl_rl.data.formats import RowFormat, detect, image_source, source_keys, to_project_row

log = logging.getLogger(__name__)
ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    messages: list[dict]
    images: list[Image.Image]
    answer: Optional[str]
    difficulty: Optional[float]
    pass_rate: Optional[float]
    source: str  # "file:line", for messages about this example later on
    extra: dict = field(default_factory=dict)

    def prompt_messages(self) -> list[dict]:
        """The conversation up to (not including) the final assistant answer."""
        messages = list(self.messages)
        while messages and messages[-1]["role"] == "assistant":
            messages.pop()
        return messages

    def question_text(self) -> str:
        """The text of the prompt's turns, image parts left out."""
        texts = []
        for message in self.prompt_messages():
            content = message.get("content")
            parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
            texts += [str(p.get("text", "")) for p in parts
                      if isinstance(p, dict) and p.get("type") == "text"]
        return "\n".join(texts)


# Byte-order marks of encodings the loader does not read (UTF-32 first: its LE mark starts
# with UTF-16's).
_FOREIGN_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
                 (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"))


def _parquet_rows(path: Path) -> Iterator[tuple[int, object]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    number = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
            for row in batch.to_pylist():
                number += 1
                yield number, row
    except (pa.ArrowException, OSError) as exc:
        # A damaged file cannot be read past the damage, so this ends the file even when bad
        # rows are skipped.
        where = f"{path}:{number + 1}" if number else str(path)
        raise DataError(f"{where}: not a readable Parquet file: {exc}") from None


def _decode_line(raw: bytes, path: Path, number: int) -> object:
    """One JSONL line as a Python value, or the DataError that says why it is not one."""
    if number == 1:
        for bom, encoding in _FOREIGN_BOMS:
            if raw.startswith(bom):
                return DataError(f"{path}:1: the file is {encoding} text (byte-order mark); "
                                 f"data files must be UTF-8")
    if b"\x00" in raw:
        return DataError(f"{path}:{number}: NUL bytes: not UTF-8 text (UTF-16 without a "
                         f"byte-order mark, or a binary file?)")
    try:
        # A UTF-8 byte-order mark (written by some Windows tools) is accepted on line 1.
        text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
    except UnicodeDecodeError as exc:
        return DataError(f"{path}:{number}: not UTF-8 text ({exc.reason} at byte {exc.start}); "
                         f"re-encode the file as UTF-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        return DataError(f"{path}:{number}: malformed JSON: {exc.msg} (column {exc.colno})")
    except RecursionError:
        return DataError(f"{path}:{number}: malformed JSON: nested too deeply")
    except ValueError as exc:  # e.g. an integer with more digits than Python converts
        return DataError(f"{path}:{number}: malformed JSON: {exc}")


def _json_rows(path: Path) -> Iterator[tuple[int, object]]:
    """A ``.json`` file's rows (a list, as LLaVA ships them), numbered from 1 by position."""
    rows = _decode_line(path.read_bytes(), path, 1)
    if isinstance(rows, DataError):
        raise rows
    if not isinstance(rows, list):
        raise DataError(f"{path}: a .json data file must hold a list of rows, got "
                        f"{type(rows).__name__}")
    yield from enumerate(rows, start=1)


def raw_rows(path: Path) -> Iterator[tuple[int, object]]:
    """(line or row number, decoded row or the DataError for it), streaming."""
    if path.suffix == ".parquet":
        yield from _parquet_rows(path)
        return
    if path.suffix == ".json":
        yield from _json_rows(path)
        return
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if raw.strip():
                yield number, _decode_line(raw, path, number)


def row_number(source: str) -> int:
    """The row (line) number of an example's ``file:number`` source."""
    return int(source.rsplit(":", 1)[1])


class RowLoader:
    """Streams ``Example``s from a JSONL or Parquet file, checking each row.

    ``require_answer``: rows must carry ``answer`` (RL prompts, evaluation splits).
    ``max_pixels``: images above it are resized down (aspect kept) or rejected.
    ``bad_rows``: "error" raises on the first bad row; "skip" counts and logs it.
    ``row_format``: the rows' shape and key mapping; ``format`` is the one read (once known).
    """

    def __init__(self, path: str | Path, *, require_answer: bool = False, max_pixels: int = 448 * 448,
                 oversize_images: Literal["resize", "reject"] = "resize",
                 bad_rows: Literal["error", "skip"] = "error", row_format: RowFormat = RowFormat()):
        self.path = Path(path)
        self.row_format = row_format
        self.format = None if row_format.name == "auto" else row_format.name
        self.require_answer = require_answer
        self.max_pixels = max_pixels
        self.oversize_images = oversize_images
        self.bad_rows = bad_rows
        self.skipped = 0
        self.resized = 0

    @classmethod
    def for_config(cls, path: str | Path, data_cfg, require_answer: bool = False) -> "RowLoader":
        """A loader with the image budget and bad-row policy of a config's ``data`` section."""
        return cls(path, require_answer=require_answer, max_pixels=data_cfg.max_pixels,
                   oversize_images=data_cfg.oversize_images, bad_rows=data_cfg.bad_rows,
                   row_format=RowFormat.from_config(data_cfg))

    @classmethod
    def prompts(cls, data_cfg, file: str) -> list[Example]:
        """The prompts (rows with an answer) of ``file``, relative to ``data.dir``."""
        return cls.for_config(Path(data_cfg.dir) / file, data_cfg, require_answer=True).load_all()

    def __iter__(self) -> Iterator[Example]:
        if not self.path.is_file():
            raise DataError(f"{self.path}: data file not found")
        for number, row in raw_rows(self.path):
            try:
                if isinstance(row, DataError):
                    raise row
                yield self._example(row, f"{self.path}:{number}")
            except DataError as exc:
                if self.bad_rows == "error":
                    raise
                self.skipped += 1
                log.warning("skipping bad row: %s", exc)
        if self.skipped:
            log.warning("%s: skipped %d bad row(s)", self.path, self.skipped)

    def load_all(self) -> list[Example]:
        return list(self)

    # ------------------------------------------------------------------ one row

    def _format_of(self, row: dict) -> str:
        """The file's format: the configured one, or the first row's (logged once per file)."""
        if self.format is None:
            self.format = detect(row, self.row_format)
            log.info("%s: reading rows as format %r (data.format=auto; detected from the keys %s)",
                     self.path, self.format, ", ".join(map(str, list(row)[:8])))
        return self.format

    def _example(self, row: object, where: str) -> Example:
        if not isinstance(row, dict):
            raise DataError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
        name = self._format_of(row)
        if name == "messages" and row.get("messages") is None:
            raise DataError(f"{where}: missing field 'messages' (nor 'conversations', 'prompt' or "
                            f"'{self.row_format.prompt_key}' of the other formats)")
        row = to_project_row(name, row, self.row_format, where)
        image_key, answer_key = source_keys(name, self.row_format)
        messages = row["messages"]
        image_refs = _image_list(row.get("images"), _check_messages(messages, where),
                                 f"{where}: field '{image_key}'")
        answer = _answer(row.get("answer"), self.require_answer, where, answer_key)
        known = {"messages", "images", "answer", "difficulty", "pass_rate"}
        return Example(
            messages=messages,
            images=[self._image(ref, f"{where}: field '{image_key}'", i)
                    for i, ref in enumerate(image_refs, start=1)],
            answer=answer,
            difficulty=_optional_number(row, "difficulty", where),
            pass_rate=_optional_number(row, "pass_rate", where, lo=0.0, hi=1.0),
            source=where,
            extra={k: v for k, v in row.items() if k not in known},
        )

    def _image(self, ref: object, at: str, number: int) -> Image.Image:
        """The ``number``-th image of a row, from a path or embedded; ``at`` names the field."""
        try:
            source = image_source(ref)
        except ValueError as exc:  # base64 that does not decode
            raise DataError(f"{at}: image {number} is not valid base64: {exc}") from None
        if source is None:
            raise DataError(f"{at} must be a list of paths or embedded images, got {short(ref)}")
        if isinstance(source, bytes):
            label = f"embedded image {number} ({len(source)} bytes)"
            return self._fit_budget(_open_image(io.BytesIO(source), label, at), label, at)
        path = self._local_path(source, at)
        return self._fit_budget(_open_image(path, str(path), at), str(path), at)

    def _local_path(self, relative: str, at: str) -> Path:
        base = self.path.parent.resolve()
        try:
            # resolve() follows symlinks, so a link that points outside is caught below too.
            path = (base / relative).resolve()
            inside = path.is_relative_to(base)
            found = inside and path.is_file()
        except (OSError, ValueError) as exc:  # a NUL byte, a name too long for the system
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise DataError(f"{at}: bad path {short(relative)}: {short(reason)}") from None
        if not inside:
            raise DataError(f"{at}: {short(relative)} points outside the data directory {base}")
        if not found:
            raise DataError(f"{at}: image file not found: {path}")
        return path

    def _fit_budget(self, image: Image.Image, label: str, at: str) -> Image.Image:
        pixels = image.width * image.height
        if pixels <= self.max_pixels:
            return image
        if self.oversize_images == "reject":
            raise DataError(f"{at}: {label} has {image.width}x{image.height} = "
                            f"{pixels} pixels, over the budget of {self.max_pixels} "
                            f"(data.max_pixels; set data.oversize_images=resize to shrink it)")
        scale = (self.max_pixels / pixels) ** 0.5
        self.resized += 1
        size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
        return image.resize(size, Image.Resampling.BICUBIC)


def _open_image(file: Path | io.BytesIO, label: str, at: str) -> Image.Image:
    """The image decoded in full, as RGB, or a DataError naming the field."""
    try:
        with Image.open(file) as image:
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError,
            Image.DecompressionBombError) as exc:
        raise DataError(f"{at}: cannot read image {label}: {exc}") from None


def _answer(answer: object, required: bool, where: str, key: str) -> Optional[str]:
    """A row's reference answer as text; ``key`` is the field the file keeps it in."""
    if answer is not None and (isinstance(answer, bool) or not isinstance(answer, (str, int, float))
                               or (not isinstance(answer, str) and not _finite(answer))):
        raise DataError(f"{where}: field '{key}' must be a string or a finite number, "
                        f"got {short(answer)}")
    if required and (answer is None or str(answer).strip() == ""):
        raise DataError(f"{where}: missing field '{key}' (required in this file)")
    return None if answer is None else str(answer)


def _image_list(refs: object, placeholders: int, at: str) -> list:
    """A row's images (paths or embedded), as many as its messages have image parts."""
    refs = [] if refs is None else refs
    if not isinstance(refs, list):
        raise DataError(f"{at} must be a list of images (paths or embedded bytes), got {short(refs)}")
    if placeholders != len(refs):
        raise DataError(f"{at}: the messages have {placeholders} image placeholder(s) but the row "
                        f"lists {len(refs)} image(s)")
    return refs


def _check_messages(messages: object, where: str) -> int:
    """Validate the chat structure; return the number of image placeholders."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field 'messages' must be a non-empty list of messages")
    images = 0
    for i, message in enumerate(messages):
        at = f"{where}: field 'messages[{i}]'"
        if not isinstance(message, dict):
            raise DataError(f"{at} must be an object with 'role' and 'content'")
        if message.get("role") not in ROLES:
            raise DataError(f"{at}: 'role' must be one of {ROLES}, got {short(message.get('role'))}")
        reasoning = message.get("reasoning_content")
        if reasoning is not None and not isinstance(reasoning, str):
            raise DataError(f"{at}: 'reasoning_content' must be a string, got {short(reasoning)}")
        content = message.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise DataError(f"{at}: 'content' must be a string or a list of parts")
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image":
                images += 1
            elif kind != "text" or not isinstance(part.get("text"), str):
                raise DataError(f"{at}.content[{j}]: expected {{'type': 'text', 'text': ...}} "
                                f"or {{'type': 'image'}}, got {short(part)}")
    return images


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _optional_number(row: dict, name: str, where: str, lo: float | None = None,
                     hi: float | None = None) -> Optional[float]:
    value = row.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"{where}: field '{name}' must be a number, got {short(value)}")
    if not _finite(value):
        raise DataError(f"{where}: field '{name}' must be a finite number, got {short(value)}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise DataError(f"{where}: field '{name}' must be in [{lo}, {hi}], got {value}")
    return float(value)

"""The row shapes other trainers' datasets already have, each read into a row of the project's
own format (``rows.py``), so that one validator checks them all.

- ``messages``: the project's own rows, and TRL / Hugging Face chat rows (``content`` a plain
  string holding ``<image>`` placeholders, images in the image column).
- ``easyr1``: ``problem`` text holding ``<image>``, ``answer``, ``images`` (its column names are
  ``data.prompt_key``, ``data.answer_key``, ``data.image_key``).
- ``verl``: ``prompt`` (a chat list whose text holds ``<image>``), ``images``,
  ``reward_model.ground_truth``; ``data_source`` and ``extra_info`` are kept as extra fields.
- ``llava``: ``conversations`` of ``{from: human|gpt|system, value}`` and one ``image`` path; the
  reference answer is an ``answer`` field or else the last ``gpt`` turn's answer.

The functions here only reshape: images stay as the file has them (paths, bytes, ``{bytes,
path}`` structs, base64 strings) for the loader to decode and check.
"""
from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Callable

from kimivl_rl.config.schema import TEMPLATE_SLOT
from kimivl_rl.data.errors import DataError, short
from kimivl_rl.reward.extract import extract_answer

FORMATS = ("messages", "easyr1", "verl", "llava")
PLACEHOLDER = "<image>"
LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
# How base64 text of a PNG, JPEG, GIF or WebP file begins: a bare string that starts so is
# taken as an embedded image, any other string as a path.
BASE64_IMAGE_STARTS = ("iVBORw0KGgo", "/9j/", "R0lGOD", "UklGR")


@dataclass(frozen=True)
class RowFormat:
    """How to read a file's rows: its format (or ``auto``) and EasyR1's key mapping."""
    name: str = "auto"
    prompt_key: str = "problem"
    answer_key: str = "answer"
    image_key: str = "images"
    prompt_template: str = ""

    @classmethod
    def from_config(cls, data_cfg) -> "RowFormat":
        return cls(data_cfg.format, data_cfg.prompt_key, data_cfg.answer_key, data_cfg.image_key,
                   data_cfg.prompt_template)


def detect(row: dict, fmt: RowFormat) -> str:
    """The format a row's keys show; rows with none of the others' keys are the project's own."""
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "llava"
    if "reward_model" in row or isinstance(row.get("prompt"), list):
        return "verl"
    if fmt.prompt_key in row:
        return "easyr1"
    return "messages"


def to_project_row(name: str, row: dict, fmt: RowFormat, where: str) -> dict:
    """``row`` (of format ``name``) as a row of the project's format, template applied."""
    converted = _CONVERTERS[name](row, fmt, where)
    if fmt.prompt_template:
        converted["messages"] = with_template(converted["messages"], fmt.prompt_template)
    return converted


def source_keys(name: str, fmt: RowFormat) -> tuple[str, str]:
    """Where a row of format ``name`` keeps its images and its answer, for error messages."""
    images = "image" if name == "llava" else fmt.image_key
    answer = {"easyr1": fmt.answer_key, "verl": "reward_model.ground_truth"}.get(name, "answer")
    return images, answer


def _messages_row(row: dict, fmt: RowFormat, where: str) -> dict:
    messages = row["messages"]
    if isinstance(messages, str):  # Parquet files may hold the chat as a JSON string
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: field 'messages': malformed JSON string: {exc.msg}") from None
    # Rows that mark images with typed parts keep any literal "<image>" in their text.
    if not _has_image_parts(messages):
        messages = split_placeholders(messages)
    rest = {k: v for k, v in row.items() if k not in ("messages", fmt.image_key)}
    return {**rest, "messages": messages, "images": row.get(fmt.image_key)}


def _easyr1_row(row: dict, fmt: RowFormat, where: str) -> dict:
    problem = _required(row, fmt.prompt_key, where, "data.prompt_key")
    if not isinstance(problem, str):
        raise DataError(f"{where}: field '{fmt.prompt_key}' must be a string, got {short(problem)}")
    rest = {k: v for k, v in row.items() if k not in (fmt.prompt_key, fmt.answer_key, fmt.image_key)}
    return {**rest, "messages": split_placeholders([{"role": "user", "content": problem}]),
            "images": row.get(fmt.image_key), "answer": row.get(fmt.answer_key)}


def _verl_row(row: dict, fmt: RowFormat, where: str) -> dict:
    prompt = _required(row, "prompt", where)
    reward_model = row.get("reward_model")
    if reward_model is not None and not isinstance(reward_model, dict):
        raise DataError(f"{where}: field 'reward_model' must be an object with 'ground_truth', "
                        f"got {short(reward_model)}")
    rest = {k: v for k, v in row.items() if k not in ("prompt", "reward_model", fmt.image_key)}
    return {**rest, "messages": split_placeholders(prompt), "images": row.get(fmt.image_key),
            "answer": (reward_model or {}).get("ground_truth")}


def _llava_row(row: dict, fmt: RowFormat, where: str) -> dict:
    turns = _required(row, "conversations", where)
    if not isinstance(turns, list):
        raise DataError(f"{where}: field 'conversations' must be a list of turns")
    image = row.get("image")
    rest = {k: v for k, v in row.items() if k not in ("conversations", "image")}
    messages = [_llava_turn(t, i, where) for i, t in enumerate(turns)]
    return {"answer": _llava_reference(messages), **rest, "messages": split_placeholders(messages),
            "images": [] if image is None else image if isinstance(image, list) else [image]}


def _llava_reference(messages: list[dict]) -> str | None:
    """A LLaVA row's reference answer when it has no ``answer`` field: its last ``gpt`` turn,
    read as the reward reads a response (``\\boxed{}``, "Answer: X", a choice, or short text)."""
    if not messages or messages[-1]["role"] != "assistant":
        return None
    return extract_answer(messages[-1]["content"]).answer


def _llava_turn(turn: object, i: int, where: str) -> dict:
    at = f"{where}: field 'conversations[{i}]'"
    if not isinstance(turn, dict) or turn.get("from") not in LLAVA_ROLES:
        raise DataError(f"{at}: expected {{'from': one of {tuple(LLAVA_ROLES)}, 'value': ...}}, "
                        f"got {short(turn)}")
    if not isinstance(turn.get("value"), str):
        raise DataError(f"{at}: 'value' must be a string, got {short(turn.get('value'))}")
    return {"role": LLAVA_ROLES[turn["from"]], "content": turn["value"]}


_CONVERTERS: dict[str, Callable[[dict, RowFormat, str], dict]] = {
    "messages": _messages_row, "easyr1": _easyr1_row, "verl": _verl_row, "llava": _llava_row}


def _required(row: dict, key: str, where: str, setting: str = "") -> object:
    if row.get(key) is None:
        named = f" (set by {setting})" if setting else ""
        raise DataError(f"{where}: missing field '{key}'{named}")
    return row[key]


def _has_image_parts(messages: object) -> bool:
    return isinstance(messages, list) and any(
        isinstance(m, dict) and isinstance(m.get("content"), list)
        and any(isinstance(p, dict) and p.get("type") == "image" for p in m["content"])
        for m in messages)


def text_parts(text: str) -> list[dict] | str:
    """``text`` with each ``<image>`` as an image part, in order; text without one stays a
    string. Whitespace around a placeholder (LLaVA's ``<image>\\n``) is dropped."""
    if PLACEHOLDER not in text:
        return text
    parts: list[dict] = []
    for i, piece in enumerate(text.split(PLACEHOLDER)):
        if i:
            parts.append({"type": "image"})
        if piece.strip():
            parts.append({"type": "text", "text": piece.strip()})
    return parts


def parts_text(parts: list) -> str:
    """The inverse of ``text_parts``: typed parts as text with ``<image>`` placeholders."""
    return "\n".join(PLACEHOLDER if p.get("type") == "image" else str(p.get("text", ""))
                     for p in parts if isinstance(p, dict))


def split_placeholders(messages: object) -> object:
    """Each message whose string content holds ``<image>`` with typed parts instead; anything
    that is not a list of messages is left for the validator to name."""
    if not isinstance(messages, list):
        return messages
    return [{**m, "content": text_parts(m["content"])}
            if isinstance(m, dict) and isinstance(m.get("content"), str) else m for m in messages]


def with_template(messages: object, template: str) -> object:
    """The first user turn's text put into ``template`` at ``{problem}`` (a format instruction
    such as EasyR1's), its images kept in place."""
    if not isinstance(messages, list):
        return messages
    for i, message in enumerate(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            text = parts_text(content) if isinstance(content, list) else str(content)
            filled = text_parts(template.replace(TEMPLATE_SLOT, text))
            return [*messages[:i], {**message, "content": filled}, *messages[i + 1:]]
    return messages


def image_source(ref: object) -> bytes | str | None:
    """An image as a file holds it, reduced to its bytes or its path; None when it is neither.

    Hugging Face's ``{bytes, path}`` struct is read by its bytes when it has them (base64 text in
    JSON); strings are ``data:`` URIs, bare base64 of a known image type, or paths. Raises
    ValueError for base64 that does not decode."""
    if isinstance(ref, dict):
        data, path = ref.get("bytes"), ref.get("path")
        if data:
            return _base64(data) if isinstance(data, str) else image_source(data)
        return path if isinstance(path, str) else None
    if isinstance(ref, (bytes, bytearray)):
        return bytes(ref)
    if not isinstance(ref, str):
        return None
    if ref.startswith("data:") and ";base64," in ref:
        return _base64(ref.split(",", 1)[1])
    return _base64(ref) if ref.startswith(BASE64_IMAGE_STARTS) and len(ref) >= 64 else ref


def _base64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)

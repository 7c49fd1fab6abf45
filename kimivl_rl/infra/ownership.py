"""What kimivl-rl may replace: only what it wrote itself. A user's files are never deleted or
overwritten.

- A directory may be replaced when it is missing or empty, or when a record kimivl-rl wrote
  (the data manifest, a stats file) lists every file under it with that file's current sha256.
- An output directory is kimivl-rl's when it holds ``OUTPUT_MARKER``, written when kimivl-rl
  created it (or took it over while it was empty), or when the caller recognises it as the
  output of an earlier run.
- A single output file may be replaced when it is missing, or when its sidecar
  (``<stem>.stats.json`` beside it, written by kimivl-rl) records its current sha256; the
  sidecar itself is replaced only when it is such a record.

Every refusal is a ``NotOursError`` that names the setting, the path and the fix; it is raised
before anything is written. Staging paths get unique names, so they never clobber anything.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Callable, Mapping, Optional

OUTPUT_MARKER = "kimivl-rl-output.json"
SHA_KEY = "output_sha256"  # in a sidecar: the sha256 of the file it describes
_LISTED = 3  # foreign files named in a refusal


class NotOursError(ValueError):
    """A write would replace files kimivl-rl did not write; nothing was changed."""


def refusal(setting: str, path: Path, reason: str, fix: str) -> NotOursError:
    return NotOursError(f"{setting} {path} {reason}; kimivl-rl replaces only what it wrote "
                        f"itself, so nothing was changed. {fix}")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_hashes(directory: Path) -> dict[str, str]:
    """``{path relative to directory: sha256}`` of every file under ``directory``."""
    return {p.relative_to(directory).as_posix(): sha256_of(p)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _entries(directory: Path) -> list[Path]:
    """Everything under ``directory`` that is not a real directory (files, links, ...)."""
    found = []
    for root, dirs, files in os.walk(directory):  # does not follow linked directories
        found += [Path(root) / name for name in files]
        found += [Path(root) / name for name in dirs if (Path(root) / name).is_symlink()]
    return sorted(found)


def unrecorded_files(directory: Path, recorded: Mapping[str, str]) -> list[str]:
    """Entries under ``directory`` that ``recorded`` does not list with their current sha256."""
    if directory.exists() and not directory.is_dir():
        return [directory.name]
    foreign = []
    for entry in _entries(directory):
        name = entry.relative_to(directory).as_posix()
        # kimivl-rl never writes links, so a link is always someone else's.
        if entry.is_symlink() or recorded.get(name) != sha256_of(entry):
            foreign.append(name)
    return foreign


def _listing(names: list[str]) -> str:
    more = f", ... ({len(names)} in all)" if len(names) > _LISTED else ""
    return ", ".join(names[:_LISTED]) + more


def check_replaceable_dir(directory: Path, recorded: Optional[Mapping[str, str]], setting: str,
                          fix: str) -> None:
    """Raise ``NotOursError`` unless every file under ``directory`` is in ``recorded`` (None: no
    record of ours) with its current sha256; a missing or empty directory passes."""
    foreign = unrecorded_files(directory, recorded or {})
    if foreign:
        raise refusal(setting, directory, f"holds files kimivl-rl did not write ({_listing(foreign)})",
                      fix)


def is_empty(directory: Path) -> bool:
    """Missing, or a directory with nothing in it: a safe place to build into."""
    return not directory.exists() or (directory.is_dir() and not any(directory.iterdir()))


def claim_output_dir(directory: Path, setting: str, fix: str,
                     earlier_output: Callable[[Path], bool]) -> None:
    """Make sure ``directory`` is kimivl-rl's output directory: it holds ``OUTPUT_MARKER``, or
    ``earlier_output`` recognises it, or it is missing or empty (then it is created and marked).
    Raise ``NotOursError`` otherwise."""
    if (directory / OUTPUT_MARKER).is_file() or (directory.is_dir() and earlier_output(directory)):
        return
    if not is_empty(directory):
        raise refusal(setting, directory, f"is not empty and has no {OUTPUT_MARKER} (kimivl-rl "
                      f"did not create it)", fix)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / OUTPUT_MARKER).write_text(json.dumps(
        {"created_by": "kimivl-rl", "note": "kimivl-rl writes its outputs here"}, indent=1))


def sidecar_path(file: Path) -> Path:
    return file.with_name(file.stem + ".stats.json")


def read_sidecar(file: Path) -> Optional[dict]:
    """The record kimivl-rl wrote beside ``file``; None when there is none (or it is not ours)."""
    try:
        record = json.loads(sidecar_path(file).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and SHA_KEY in record else None


def check_replaceable_file(file: Path, setting: str, fix: str) -> None:
    """Raise ``NotOursError`` unless ``file`` is missing or its sidecar records its current
    sha256, and the sidecar is missing or a record of ours."""
    sidecar, record = sidecar_path(file), read_sidecar(file)
    if sidecar.exists() and record is None:
        raise refusal(setting, file, f"would replace {sidecar.name} beside it, which kimivl-rl did "
                      f"not write", fix)
    ours = record is not None and file.is_file() and record[SHA_KEY] == sha256_of(file)
    if file.exists() and not ours:
        raise refusal(setting, file, "exists and was not written by kimivl-rl (or changed since)",
                      fix)


def staging_dir(target: Path) -> Path:
    """A new, uniquely named directory beside ``target`` to build it in (never an existing one;
    plain ``mkdir`` keeps the user's umask, unlike ``tempfile.mkdtemp``)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f"{target.name}.{secrets.token_hex(4)}.partial")
    staging.mkdir()
    return staging


def staging_file(target: Path) -> Path:
    """A uniquely named path beside ``target`` to write it to first; open it with mode ``"x"``."""
    return target.with_name(f"{target.name}.{secrets.token_hex(4)}.partial")

"""Checkpoint files without pickle: tensors in safetensors, everything else in JSON.

``save_state`` flattens a nested state (dicts, lists, tensors, numbers, strings) into one
safetensors file plus a JSON skeleton; ``load_state`` rebuilds it. Nothing is unpickled, so a
checkpoint from elsewhere cannot run code. ``atomic_dir`` writes a directory under a temporary
name and renames it into place with a manifest of checksums, so a crash mid-write never leaves
a directory that looks complete.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors.torch import load_file, save_file

from kimivl_rl.infra.ownership import sha256_of

MANIFEST = "MANIFEST.json"
_TENSOR = "__tensor__"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or corrupt."""


def _flatten(value: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        # A copy: tied weights share storage, which safetensors refuses to write.
        tensors[key] = value.detach().cpu().clone().contiguous()
        return {_TENSOR: key}
    if isinstance(value, dict):
        # JSON keys are strings: keep the original key types (optimizer states use ints).
        return {"__dict__": [[_flatten(k, f"{key}.k{i}", tensors), _flatten(v, f"{key}.{i}", tensors)]
                             for i, (k, v) in enumerate(value.items())]}
    if isinstance(value, (list, tuple)):
        items = [_flatten(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]
        return {"__tuple__": items} if isinstance(value, tuple) else items
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store {type(value).__name__} at {key!r} in a checkpoint")


def _unflatten(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_unflatten(v, tensors) for v in value]
    if isinstance(value, dict):
        if _TENSOR in value:
            return tensors[value[_TENSOR]]
        if "__tuple__" in value:
            return tuple(_unflatten(v, tensors) for v in value["__tuple__"])
        return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in value["__dict__"]}
    return value


def save_state(state: Any, path_prefix: str | Path) -> None:
    """Write ``state`` to ``<prefix>.safetensors`` and ``<prefix>.json``."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(state, "s", tensors)
    save_file(tensors, f"{path_prefix}.safetensors")
    Path(f"{path_prefix}.json").write_text(json.dumps(skeleton))


def load_state(path_prefix: str | Path) -> Any:
    skeleton = json.loads(Path(f"{path_prefix}.json").read_text())
    return _unflatten(skeleton, load_file(f"{path_prefix}.safetensors"))


def write_manifest(directory: Path) -> None:
    files = {str(p.relative_to(directory)): sha256_of(p)
             for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST}
    (directory / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def verify_manifest(directory: str | Path) -> None:
    """Raise ``CheckpointError`` unless every file of the manifest is there, unchanged."""
    directory = Path(directory)
    manifest = directory / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(f"{directory}: no {MANIFEST}; the checkpoint is incomplete")
    for name, digest in json.loads(manifest.read_text())["files"].items():
        path = directory / name
        if not path.is_file() or sha256_of(path) != digest:
            raise CheckpointError(f"{directory}: {name} is missing or does not match its checksum")


@contextlib.contextmanager
def atomic_dir(final: str | Path, before_publish: Callable[[], None] = lambda: None) -> Iterator[Path]:
    """Yield a temporary directory; on success, add a manifest, call ``before_publish`` (the
    directory is complete but not yet visible) and rename it to ``final``."""
    final = Path(final)
    staging = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        write_manifest(staging)
        before_publish()
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

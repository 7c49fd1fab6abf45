"""The memory allocator of the processes that run a model (``cluster.malloc``).

vLLM engines and learners on CPU run faster with tcmalloc than with glibc's malloc (the RL
benchmark's figures are in bench/README.md), which is why vLLM's CPU guide preloads it. The
library is preloaded (``LD_PRELOAD``) through the actors' Ray runtime environment, so it takes
effect in the worker process from its start and in the engine processes it spawns.
"""
from __future__ import annotations

import ctypes.util
import logging
import os
from functools import lru_cache
from typing import Optional

from kimivl_rl.config import Config, ConfigError

log = logging.getLogger(__name__)
TCMALLOC_NAMES = ("tcmalloc_minimal", "tcmalloc")
INSTALL_HINT = "apt-get install libtcmalloc-minimal4 (scripts/setup.sh does where it can)"
# tcmalloc reports each allocation above 1 GiB on stderr; a model's weights are not news.
QUIET = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(2**40)}


@lru_cache(maxsize=None)
def find_tcmalloc() -> Optional[str]:
    """The tcmalloc library the dynamic loader would find (its soname), or None."""
    return next(filter(None, map(ctypes.util.find_library, TCMALLOC_NAMES)), None)


def preload_library(spec: str) -> Optional[str]:
    """What ``cluster.malloc`` asks to preload: None for the system's allocator."""
    key = f"cluster.malloc={spec!r}"
    if spec == "system":
        return None
    if spec in ("auto", "tcmalloc"):
        library = find_tcmalloc()
        if library is None and spec == "tcmalloc":
            raise ConfigError(f"{key}: no tcmalloc library on this machine; {INSTALL_HINT}, "
                              f"or set cluster.malloc=system")
        if library is None:
            _hint_once()
        return library
    if not os.path.isfile(spec):
        raise ConfigError(f"{key}: no such file (expected auto, system, tcmalloc or the path of "
                          f"a shared library)")
    return spec


@lru_cache(maxsize=None)
def _hint_once() -> None:
    log.info("cluster.malloc=auto: no tcmalloc found, so rollout and learner processes use the "
             "system allocator, which is slower on CPU; %s", INSTALL_HINT)


def allocator_env(cfg: Config) -> dict[str, str]:
    """Environment variables that give a model-running actor ``cluster.malloc``'s allocator,
    keeping whatever the driver already preloads."""
    library = preload_library(cfg.cluster.malloc)
    if library is None:
        return {}
    preloaded = [p for p in os.environ.get("LD_PRELOAD", "").split(":") if p and p != library]
    return {"LD_PRELOAD": ":".join([library, *preloaded]), **QUIET}


def with_allocator(cfg: Config, options: dict) -> dict:
    """Ray actor or task ``options`` with the allocator's variables added to its runtime env."""
    env = allocator_env(cfg)
    if not env:
        return options
    return {**options, "runtime_env": {"env_vars": env}}

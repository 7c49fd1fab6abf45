"""cluster.malloc: which allocator the model-running actors preload, and the errors that name it."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kimivl_rl.config import ConfigError, load_config
from kimivl_rl.infra import allocator
from kimivl_rl.infra.allocator import allocator_env, preload_library, with_allocator


def cfg_with(malloc: str):
    return load_config("configs/tiny.yaml", [f"cluster.malloc={malloc}"])


@pytest.fixture
def no_tcmalloc(monkeypatch):
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: None)


def test_system_preloads_nothing_and_leaves_actor_options_alone():
    options = {"name": "rollout-0", "num_cpus": 0.5}
    assert preload_library("system") is None
    assert with_allocator(cfg_with("system"), options) is options


def test_tcmalloc_is_preloaded_quietly_before_what_the_driver_preloads(monkeypatch):
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: "libtcmalloc_minimal.so.4")
    monkeypatch.setenv("LD_PRELOAD", "/opt/a.so:libtcmalloc_minimal.so.4")
    env = allocator_env(cfg_with("tcmalloc"))
    assert env == {"LD_PRELOAD": "libtcmalloc_minimal.so.4:/opt/a.so",
                   "TCMALLOC_AGGRESSIVE_DECOMMIT": "true",
                   "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(2**40)}
    assert with_allocator(cfg_with("auto"), {"num_cpus": 1}) == {"num_cpus": 1,
                                                                 "runtime_env": {"env_vars": env}}


def test_auto_falls_back_to_the_system_allocator_where_tcmalloc_is_missing(no_tcmalloc):
    assert allocator_env(cfg_with("auto")) == {}


def test_tcmalloc_asked_for_but_missing_is_an_error_naming_the_key(no_tcmalloc):
    with pytest.raises(ConfigError, match=r"cluster.malloc='tcmalloc': no tcmalloc library .*"
                                          r"libtcmalloc-minimal4.*cluster.malloc=system"):
        preload_library("tcmalloc")


def test_a_library_path_must_exist(tmp_path):
    library = tmp_path / "libmymalloc.so"
    with pytest.raises(ConfigError, match=r"cluster.malloc='.*libmymalloc.so': no such file"):
        preload_library(str(library))
    library.write_bytes(b"")
    assert allocator_env(cfg_with(str(library)))["LD_PRELOAD"].split(":")[0] == str(library)


def test_setup_installs_tcmalloc_here():
    """scripts/setup.sh installs it on Debian-like machines; `auto` then preloads it."""
    assert allocator.find_tcmalloc(), "no tcmalloc: apt-get install libtcmalloc-minimal4"


FREE_AND_MEASURE = """
import psutil, torch
rss = lambda: psutil.Process().memory_info().rss
before = rss()
held = torch.ones(512, 1024, 1024)  # 2 GiB in one block, as a vLLM engine's KV cache (tcmalloc
                                    # keeps a freed block this size, not a 1 GiB one)
peak = rss()
del held
print((peak - before) / 2**30, (rss() - before) / 2**30)
"""


def test_a_process_with_tcmalloc_gives_freed_memory_back():
    """Another engine in the same process (evaluation tasks share Ray workers) sizes its KV cache
    from the process's RSS, so what the first one freed must leave it."""
    env = {**os.environ, **allocator_env(cfg_with("tcmalloc"))}
    result = subprocess.run([sys.executable, "-c", FREE_AND_MEASURE], env=env, capture_output=True,
                            text=True, check=True)
    peak, after = map(float, result.stdout.split())
    assert peak > 1.9 and after < 0.1, result.stdout

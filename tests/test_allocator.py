"""cluster.malloc: which allocator the model-running actors preload, and the errors that name it."""
from __future__ import annotations

import os

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



@pytest.mark.slow
def test_engine_tasks_run_in_fresh_processes_that_preload_tcmalloc(ray_cluster):
    """A task that builds a vLLM engine (evaluation, keep_solved) gets a process of its own: the
    engine sizes its KV cache from the process's RSS, which tcmalloc would still hold from the
    previous task's engine."""
    from kimivl_rl.evaluation import on_rollout_resources

    def pid_and_maps(_config):
        return os.getpid(), open("/proc/self/maps").read()

    cfg = cfg_with("tcmalloc")
    (first, maps), (second, _) = (on_rollout_resources(cfg, pid_and_maps, step="probe") for _ in "12")
    assert first != second and "libtcmalloc" in maps

"""Shared fixtures: the tiny model and a small built-in data set, built once per session."""
from __future__ import annotations

import pytest

from kimivl_rl.data.build import BuildSpec, build_dataset
from kimivl_rl.models.tiny import TinyVLMSpec, build_tiny_vlm
from kimivl_rl.prepare import tiny_corpus

SMALL_DATA = BuildSpec(seed=0, joint_sft_examples=60, long_cot_examples=30, rl_prompts=40,
                       eval_examples=20)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return build_tiny_vlm(tmp_path_factory.mktemp("tiny") / "model", TinyVLMSpec(seed=0), tiny_corpus())


@pytest.fixture(scope="session")
def small_data_dir(tmp_path_factory):
    return build_dataset(SMALL_DATA, tmp_path_factory.mktemp("data") / "builtin", progress=False)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the integration tests of a session."""
    import ray

    # The dashboard serves the state API that Ray Train's placement-group cleaner polls; without
    # it the cleaner can decide a live run is dead and tear its workers down.
    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1")
    yield
    ray.shutdown()

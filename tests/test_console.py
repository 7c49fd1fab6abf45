"""A quiet console: progress bars, each stage's results and warnings, while each RL iteration's
metrics, each SFT log step, Ray Train's INFO lines (a ``TrainingReport(...)`` per report) and vLLM's
INFO lines come only with ``output.verbose`` (``--verbose``); the metrics sink records them either
way. tests/test_sft_ray.py looks at the console of a real SFT run."""
from __future__ import annotations

import logging

import yaml

from kimivl_rl.cli import main
from kimivl_rl.config import load_config

TINY = "configs/tiny.yaml"
QUIET, VERBOSE = load_config(TINY), load_config(TINY, ["output.verbose=true"])


class Sink:
    def __init__(self):
        self.logged = []

    def log(self, step, metrics):
        self.logged.append((step, metrics))


def test_an_rl_iteration_logs_its_metrics_only_when_verbose(caplog):
    from kimivl_rl.system.controller import RLRun

    for verbose in (False, True):
        cfg = load_config(TINY, [f"output.verbose={verbose}", "rl.checkpoint_every=5"])
        sink = Sink()
        caplog.clear()
        with caplog.at_level(logging.INFO):
            RLRun(cfg, None, None, None, sink, []).record(1, {"reward_mean": 0.25})
        assert sink.logged == [(1, {"reward_mean": 0.25})]  # not a checkpoint iteration
        assert any("'reward_mean': 0.25" in r.getMessage() for r in caplog.records) == verbose


def test_ray_train_logs_reports_only_when_verbose():
    from ray.train.v2._internal.execution import context

    from kimivl_rl.sft.trainer import ray_train_log_level, set_report_log_level

    level = context.logger.level
    try:
        set_report_log_level(QUIET)
        assert not context.logger.isEnabledFor(logging.INFO)
        assert context.logger.isEnabledFor(logging.WARNING)
        set_report_log_level(VERBOSE)
        assert context.logger.isEnabledFor(logging.INFO)
    finally:
        context.logger.setLevel(level)
    assert (ray_train_log_level(QUIET), ray_train_log_level(VERBOSE)) == ("WARNING", "INFO")


def test_vllm_logs_warnings_only_unless_verbose():
    from kimivl_rl.rollout.vllm_engine import engine_options

    assert engine_options(QUIET, "m").log_level == "WARNING"
    assert engine_options(VERBOSE, "m").log_level == "INFO"


def test_the_verbose_flag_sets_the_key(capsys):
    assert main(["config", "show", TINY]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["output"]["verbose"] is False
    assert main(["config", "show", TINY, "--verbose"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["output"]["verbose"] is True

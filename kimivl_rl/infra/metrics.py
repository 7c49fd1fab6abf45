"""Where metrics go: a JSONL file (plots, tests), TensorBoard, and Ray's metrics endpoint
(Prometheus/Grafana), under one call."""
from __future__ import annotations

import json
import logging
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from kimivl_rl.infra.layout import STAGE_DIRS, OutputLayout


def detail_level(cfg) -> int:
    """The log level of per-step detail (each RL iteration's metrics, each SFT log step): INFO,
    which the console shows, with ``output.verbose``; else DEBUG, which it leaves out. The
    sink records every metric either way."""
    return logging.INFO if cfg.output.verbose else logging.DEBUG


class MetricsSink:
    def __init__(self, jsonl: Path, tensorboard_dir: Optional[Path], prefix: str):
        self.jsonl, self.prefix = jsonl, prefix
        self.jsonl.parent.mkdir(parents=True, exist_ok=True)
        self.writer = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(tensorboard_dir))
        self.gauges: dict = {}

    @classmethod
    def for_stage(cls, cfg, stage: str) -> MetricsSink:
        """A stage's metrics.jsonl, its TensorBoard run (with ``output.tensorboard``) and its
        gauges ``kimivl_<stage dir>_*``."""
        layout = OutputLayout.of(cfg)
        return cls(layout.metrics(stage), layout.tensorboard(stage) if cfg.output.tensorboard
                   else None, STAGE_DIRS[stage])

    def _gauge(self, key: str):
        from ray.util.metrics import Gauge

        if key not in self.gauges:
            self.gauges[key] = Gauge(f"kimivl_{self.prefix}_{key}", description=f"{self.prefix} {key}")
        return self.gauges[key]

    def log(self, step: int, metrics: dict[str, float]) -> None:
        with open(self.jsonl, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        for key, value in metrics.items():
            if not isinstance(value, (int, float)):
                continue
            if self.writer:
                self.writer.add_scalar(f"{self.prefix}/{key}", value, step)
            self._gauge(key).set(float(value))

    def close(self) -> None:
        if self.writer:
            self.writer.close()


def read_jsonl(path: Path) -> list[dict]:
    """Records by step; a step logged twice (before a crash and after resuming) keeps the last."""
    if not path.is_file():
        return []
    by_step = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def last_record(path: Path, tail_bytes: int = 8192) -> Optional[dict]:
    """The last complete record of a JSONL file that another process may be appending to."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - tail_bytes))
            lines = f.read().splitlines()
    except FileNotFoundError:
        return None
    for line in reversed(lines):
        try:
            return json.loads(line)
        except ValueError:
            continue  # a line cut by the tail window or still being written
    return None


@contextmanager
def follow_progress(jsonl: Path, desc: str, unit: str, interval_s: float = 1.0) -> Iterator[None]:
    """A driver-side progress bar fed by the metrics file a Ray Train worker appends to (records
    with ``step`` and ``total_steps``): worker processes cannot draw a terminal progress bar."""
    stop = threading.Event()
    thread = threading.Thread(target=_follow, args=(jsonl, desc, unit, interval_s, stop), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _follow(jsonl: Path, desc: str, unit: str, interval_s: float, stop: threading.Event) -> None:
    from tqdm import tqdm

    bar, finished = None, False
    while not finished:
        finished = stop.wait(interval_s)
        record = last_record(jsonl)
        if not record or "total_steps" not in record:
            continue
        if bar is None:
            bar = tqdm(total=record["total_steps"], initial=record["step"], desc=desc, unit=unit)
        bar.n = record["step"]
        if "loss" in record:
            bar.set_postfix(loss=f"{record['loss']:.3f}", refresh=False)
        bar.refresh()
    if bar is not None:
        bar.close()

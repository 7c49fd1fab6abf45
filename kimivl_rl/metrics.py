"""Where metrics go: a JSONL file (plots, tests), TensorBoard, and Ray's metrics endpoint
(Prometheus/Grafana), under one call."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional


class MetricsSink:
    def __init__(self, jsonl: Path, tensorboard_dir: Optional[Path], prefix: str):
        self.jsonl, self.prefix = jsonl, prefix
        self.jsonl.parent.mkdir(parents=True, exist_ok=True)
        self.writer = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(tensorboard_dir))
        self.gauges: dict = {}

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

"""`ray job submit` against a cluster started with `ray start --head`, as users run it, and the
project's metrics on that cluster's Prometheus endpoint.

The cluster gets its own temp dir and ports, so it neither joins nor stops the session's other
local cluster; it is stopped by killing exactly the processes it started.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from ports import free_ports

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
JOB_TIMEOUT_S = 900
SHORT_PHASE = "[{max_seq_len: 256, epochs: 1, lr_peak: 1.0e-3, lr_final: 1.0e-4, warmup_steps: 2}]"


def _ray(env: dict, *args: str, check: bool = True) -> str:
    result = subprocess.run([str(BIN / "ray"), *args], env=env, capture_output=True, text=True,
                            timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"ray {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout + result.stderr


def _scrape(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read().decode()
    except OSError:
        return ""  # the endpoint comes up a few seconds after the cluster


def _scrape_until(url: str, done: threading.Event, into: list[str]) -> None:
    while not done.wait(0.5):
        into.append(_scrape(url))


def _stop_cluster(temp_dir: str) -> None:
    """SIGKILL every process whose command line names this cluster's temp dir (raylet, GCS,
    dashboard, workers), and nothing else."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if temp_dir in cmdline:
            try:
                os.kill(int(proc.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def head_cluster():
    temp_dir = tempfile.mkdtemp(prefix="kjob_", dir="/tmp")  # short: Ray puts sockets in it
    # Every port its own: another local cluster (the session's) may hold Ray's defaults.
    names = ("gcs", "dashboard", "metrics", "agent", "agent_grpc", "runtime_env", "client")
    ports = dict(zip(names, free_ports(len(names))))
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_metrics_report_interval_ms": "1000"}
    env.pop("RAY_ADDRESS", None)
    _ray(env, "start", "--head", f"--port={ports['gcs']}", "--num-cpus=2",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={ports['dashboard']}",
         f"--metrics-export-port={ports['metrics']}", f"--temp-dir={temp_dir}",
         f"--dashboard-agent-listen-port={ports['agent']}",
         f"--dashboard-agent-grpc-port={ports['agent_grpc']}",
         f"--runtime-env-agent-port={ports['runtime_env']}",
         f"--ray-client-server-port={ports['client']}",
         "--disable-usage-stats")
    try:
        yield {"env": env, "dashboard": f"http://127.0.0.1:{ports['dashboard']}",
               "metrics": f"http://127.0.0.1:{ports['metrics']}/metrics"}
    finally:
        _stop_cluster(temp_dir)


@pytest.fixture(scope="module")
def finished_job(head_cluster, tiny_model_dir, small_data_dir, tmp_path_factory):
    """Submit a short two-stage run (joint SFT, then RL) from the repository root with
    `ray job submit --working-dir .`; poll its status and the metrics endpoint until it ends."""
    out = tmp_path_factory.mktemp("job") / "out"
    env, address = head_cluster["env"], head_cluster["dashboard"]
    entrypoint = ["kimivl-rl", "run", "configs/tiny.yaml", "--stages", "joint,rl",
                  f"model.path={tiny_model_dir}", "model.init_if_missing=false",
                  f"data.dir={small_data_dir}", "data.build_if_missing=false", f"output.dir={out}",
                  f"sft.joint.phases={SHORT_PHASE}", "sft.cpus_per_worker=0.5",
                  "sft.eval_examples=4", "sft.eval_max_new_tokens=16",
                  "rl.iterations=2", "rl.prompts_per_iteration=2", "rl.samples_per_prompt=2",
                  "rl.eval_every=1", "rl.eval_prompts=4", "rollout.max_new_tokens=12"]
    submit = ["job", "submit", "--address", address, "--working-dir", str(REPO), "--no-wait", "--",
              *entrypoint]
    submitted, deadline = _ray(env, *submit, check=False), time.monotonic() + 120
    while "No available agent to submit job" in submitted and time.monotonic() < deadline:
        time.sleep(3)  # the head's job agent comes up a little after `ray start` returns
        submitted = _ray(env, *submit, check=False)
    match = re.search(r"Job '([^']+)' submitted successfully", submitted)
    assert match, submitted[-3000:]
    job_id = match.group(1)
    # Scrape in the background: a gauge lives on the endpoint only while its process does.
    scraped, done = [], threading.Event()
    scraper = threading.Thread(target=_scrape_until, args=(head_cluster["metrics"], done, scraped))
    scraper.start()
    status, deadline = "", time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        status = _ray(env, "job", "status", "--address", address, job_id)
        # `ray job status` prints "Job '<id>' succeeded" / "failed" / "was stopped" at the end
        if re.search(rf"Job '{job_id}' (succeeded|failed|was stopped)", status):
            break
        time.sleep(3)
    done.set()
    scraper.join()
    logs = _ray(env, "job", "logs", "--address", address, job_id)
    metrics = "\n".join(line for text in scraped for line in text.splitlines()
                        if line.startswith("ray_kimivl_"))
    return {"status": status, "logs": logs, "metrics": metrics, "out": out}


def test_ray_job_submit_runs_the_pipeline(finished_job):
    assert "succeeded" in finished_job["status"], finished_job["logs"][-5000:]
    out = finished_job["out"]
    for path in ("config.yaml", "summary.json", "sft_joint/model/model.safetensors",
                 "rl/model/model.safetensors", "rl/metrics.jsonl", "plots/sft_loss.png", "plots/rl.png"):
        assert (out / path).is_file(), path
    logs = finished_job["logs"]
    assert "stage 1/2: joint SFT" in logs and "stage 2/2: RL" in logs
    assert re.search(r"RL: 100%\|\S*\| 2/2 ", logs)  # RL's progress bar, at its end


def _metric_values(text: str, name: str) -> list[float]:
    pattern = re.compile(rf"^{name}(?:{{[^}}]*}})? (\S+)$", re.MULTILINE)
    return [float(v) for v in pattern.findall(text)]


@pytest.mark.parametrize("name", ["ray_kimivl_sft_joint_loss", "ray_kimivl_rl_reward_mean",
                                  "ray_kimivl_rl_time_generate_s"])
def test_metrics_endpoint_exports_project_metrics(finished_job, name):
    values = _metric_values(finished_job["metrics"], name)
    assert values, f"{name} never appeared on the metrics endpoint"
    assert all(v == v for v in values)  # numbers, not NaN

"""Two Ray nodes on this machine, told apart by custom resources: the rollout worker (or the
learner) on the second node, the other roles on the head. The second node's raylet is SIGKILLed
mid-run: the run stops with one paragraph (the actor, the resource it needs, the newest
checkpoint, the command that resumes), and once the node is back that command finishes the run
with at most the iteration in progress lost.

In its own module: it starts and stops its own cluster, with token authentication on, and runs
RL in subprocesses, so no other module's Ray session is touched."""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from kimivl_rl.infra.metrics import read_jsonl
from ports import free_ports
from test_rl_resume import _rl_command

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).with_name("ray"))
NODE_START_S = 180  # `ray start` on a busy 2-core machine
RUN_S = 900  # one RL subprocess, vLLM engine start included

# Where each named actor runs, asked from a separate driver (this process may hold another
# module's Ray session): `python -c PLACEMENT ADDRESS NAME...` prints {name: node id}.
PLACEMENT = """
import json, sys, time, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
found = {}
while set(sys.argv[2:]) - set(found):
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["name"] in sys.argv[2:]:
            actor = ray.get_actor(entry["name"], namespace=entry["namespace"])
            found[entry["name"]] = ray.get(actor.__ray_call__.remote(
                lambda self: ray.get_runtime_context().get_node_id()))
    time.sleep(1)
print(json.dumps(found))
"""


def _session_pids(session: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        with contextlib.suppress(ProcessLookupError, PermissionError, ValueError):
            if os.getsid(int(entry)) == session:
                pids.append(int(entry))
    return pids


class RayNode:
    """One `ray start --block` in a session of its own: the node's processes (raylet, agents, the
    workers it spawns) share that session, so the test stops exactly what it started."""

    def __init__(self, args: list[str], env: dict, log: Path):
        self.process = subprocess.Popen(
            [RAY, "start", "--block", "--disable-usage-stats",
             *args],
            env=env, start_new_session=True, stdout=log.open("w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + NODE_START_S
        while "Ray runtime started" not in log.read_text():
            assert self.process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        self.raylet_pid = next(pid for pid in _session_pids(self.process.pid)
                               if "raylet/raylet" in self._cmdline(pid))
        self.node_id = self._cmdline(self.raylet_pid).split("--node_id=")[1].split("\0")[0]

    @staticmethod
    def _cmdline(pid: int) -> str:
        with contextlib.suppress(OSError):
            return Path(f"/proc/{pid}/cmdline").read_text()
        return ""

    def stop(self) -> None:
        for pid in _session_pids(self.process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait()


@contextlib.contextmanager
def ray_node(args: list[str], env: dict, log: Path):
    node = RayNode(args, env, log)
    try:
        yield node
    finally:
        node.stop()


def _token_env(tmp_path: Path) -> dict:
    """Token authentication with a token of the test's own (not the user's ~/.ray/auth_token)."""
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}


def _run(command: list[str], env: dict, log: Path, cleanup: contextlib.ExitStack) -> subprocess.Popen:
    """Start a driver that is killed, if still running, when ``cleanup`` closes."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    cleanup.callback(lambda: process.poll() is None and (process.kill(), process.wait()))
    return process


def _trained_steps(out: Path) -> list[int]:
    return [r["step"] for r in read_jsonl(out / "rl" / "metrics.jsonl") if "reward_mean" in r]


ROLES = ("learner", "reward", "rollout")


@pytest.mark.parametrize("lost", ["rollout", "learner"])
def test_a_lost_node_stops_the_run_and_the_rerun_resumes(lost, tmp_path, tiny_model_dir,
                                                         small_data_dir):
    env, out = _token_env(tmp_path), tmp_path / "out"
    port, dashboard, client, head_agent, node_agent, rejoined_agent = free_ports(6)
    address = f"127.0.0.1:{port}"
    command = [*_rl_command(tiny_model_dir, small_data_dir, out), "rl.dynamic_sampling_rounds=0",
               f"cluster.address={address}",
               *(f"cluster.{role}_resources={{{role}_node: 1}}" for role in ROLES)]
    on_head = json.dumps({f"{role}_node": 1 for role in ROLES if role != lost})
    # Ray's socket paths must stay under 108 bytes: a short directory, not tmp_path.
    with (tempfile.TemporaryDirectory(prefix="ray-", dir="/tmp") as temp_dir,
          contextlib.ExitStack() as nodes):
        common = [f"--temp-dir={temp_dir}", "--num-cpus=1"]
        head = nodes.enter_context(ray_node(
            ["--head", f"--port={port}", "--include-dashboard=false", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
             f"--dashboard-agent-listen-port={head_agent}",
             f"--resources={on_head}", *common], env, tmp_path / "head.log"))
        worker_args = [f"--address={address}", f'--resources={{"{lost}_node": 1}}', *common]
        second = nodes.enter_context(ray_node(
            [*worker_args, f"--dashboard-agent-listen-port={node_agent}"], env, tmp_path / "node2.log"))

        first = _run(command, env, tmp_path / "first.log", nodes)
        placement = subprocess.run([sys.executable, "-c", PLACEMENT, address, "learner-0", "reward-0",
                                    "rollout-0"], env=env, capture_output=True, text=True, timeout=RUN_S)
        where = json.loads(placement.stdout.splitlines()[-1])  # imports may print lines before it
        assert where == {f"{role}-0": second.node_id if role == lost else head.node_id
                         for role in ROLES}, placement.stderr[-3000:]
        checkpoints = out / "rl" / "checkpoints"
        while not (checkpoints / "iter_000001").is_dir() and first.poll() is None:
            time.sleep(0.1)
        os.kill(second.raylet_pid, signal.SIGKILL)  # the node is gone: its raylet took its workers
        killed = time.monotonic()
        first.wait(timeout=RUN_S)
        stopped_after_s = time.monotonic() - killed

        error = (tmp_path / "first.log").read_text()
        done = _trained_steps(out)
        newest = max(checkpoints.glob("iter_*"))
        assert first.returncode == 1, error[-3000:]
        assert "Traceback" not in error
        assert f"{lost}-0 died and cannot be restarted: no live node has {{'{lost}_node': 1.0}}" in error
        assert f"the newest complete checkpoint is {newest}" in error
        # Ray may still print its own log-deduplication notice after ours; ours is one line.
        resume = [line for line in error.splitlines() if "To resume:" in line]
        assert len(resume) == 1 and resume[0].startswith("kimivl-rl: error: "), error[-3000:]
        assert resume[0].endswith(f"To resume: {shlex.join(['kimivl-rl', *command[3:]])}")
        # Every finished iteration had its checkpoint: only the one in progress is lost.
        assert done and done[-1] == int(newest.name.split("_")[1]) < 3

        # The lost node's agent may outlive its raylet until cleanup: the new node gets its own port.
        nodes.enter_context(ray_node([*worker_args, f"--dashboard-agent-listen-port={rejoined_agent}"],
                                     env, tmp_path / "node2-back.log"))
        rerun = _run(command, env, tmp_path / "rerun.log", nodes)
        assert rerun.wait(timeout=RUN_S) == 0, (tmp_path / "rerun.log").read_text()[-3000:]
        assert f"resumed RL from {newest}" in (tmp_path / "rerun.log").read_text()
        assert _trained_steps(out) == [1, 2, 3]
        print(f"the run stopped {stopped_after_s:.1f}s after the raylet's SIGKILL, having finished "
              f"{done[-1]} iterations; the rerun resumed from iteration {done[-1]}")

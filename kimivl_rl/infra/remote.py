"""Waiting on Ray actors with a deadline: a hang becomes an error naming the actor and the step,
and a call whose actor died can be re-submitted once the actor is back."""
from __future__ import annotations

import time
from typing import Any, Callable, Optional, Sequence, Union


class RemoteTimeout(TimeoutError):
    """An actor did not answer in time."""


class ActorFailed(RuntimeError):
    """An actor died during a call and was not (or could no longer be) recovered."""

    def __init__(self, actor: str, step: str, detail: str):
        super().__init__(f"{actor} died during '{step}' {detail}")
        self.actor, self.step = actor, step

    @property
    def role(self) -> str:
        """What the actor is ("learner", "rollout", "reward"): its name without the index."""
        return self.actor.split("-")[0]


class ActorStranded(RuntimeError):
    """An actor died and no live node has the resources it asks for, so Ray cannot restart it
    before a node that has them joins: its own node has left the cluster."""

    def __init__(self, actor: str, missing: dict[str, float], wanted: dict[str, float]):
        role = actor.split("-")[0]
        super().__init__(f"{actor} died and cannot be restarted: no live node has {missing} of the "
                         f"{wanted} it asks for (cluster.{role}_resources, cluster.{role}_cpus), so "
                         f"the node it ran on has left the cluster")
        self.actor, self.missing = actor, missing


class RunStopped(RuntimeError):
    """The run cannot go on; the message says what died and where the run resumes from (the CLI
    prints it without a traceback and adds the command that resumes)."""


class LearnerGroupLost(RunStopped):
    """The learner group died more often than ``cluster.max_learner_restarts`` allows."""


Names = Union[str, Sequence[str]]
RESTART_POLL_S = 1.0  # how often a wait for a restart checks that the actor still fits a live node


def _name_list(names: Names, count: int) -> list[str]:
    """Actor names; a role name ("learner") names the i-th actor as Ray does (``learner-i``)."""
    if isinstance(names, str):
        return [f"{names}-{i}" for i in range(count)]
    return list(names)


def call_all(submits: Sequence[Callable[[], Any]], names: Names, step: str, timeout_s: float,
             recover: Optional[Callable[[int], Optional[str]]] = None, retries: int = 0) -> list[Any]:
    """Submit every call (``submit()`` returns an ObjectRef) and wait for all of them.

    A call whose actor died (``RayActorError``) is re-submitted after ``recover(i)`` has brought
    actor ``i`` back, or moved call ``i`` to another actor and returned that actor's name, at most
    ``retries`` times per call; an exception raised inside the actor's method is never retried.
    Fails with ``RemoteTimeout`` naming the actors still busy when ``timeout_s`` has passed since
    the last (re-)submission.
    """
    import ray

    names = _name_list(names, len(submits))
    refs = [submit() for submit in submits]
    results: list[Any] = [None] * len(submits)
    attempts = [0] * len(submits)
    pending = set(range(len(submits)))
    deadline = time.monotonic() + timeout_s
    while pending:
        waiting = {refs[i]: i for i in pending}
        ready, _ = ray.wait(list(waiting), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            busy = ", ".join(names[i] for i in sorted(pending))
            raise RemoteTimeout(f"{busy} did not finish '{step}' within {timeout_s:.0f}s "
                                f"(cluster.call_timeout_s)")
        i = waiting[ready[0]]
        try:
            results[i] = ray.get(ready[0])
        except ray.exceptions.RayActorError as exc:
            if recover is None or attempts[i] >= retries:
                raise ActorFailed(names[i], step, f"(after {attempts[i]} recoveries): {exc}") from exc
            attempts[i] += 1
            names[i] = recover(i) or names[i]
            refs[i] = submits[i]()
            deadline = time.monotonic() + timeout_s
            continue
        pending.discard(i)
    return results


def wait_all(refs: list, names: Names, step: str, timeout_s: float) -> list[Any]:
    """``ray.get`` of calls already submitted, with a deadline and the actors' names in errors."""
    return call_all([lambda ref=ref: ref for ref in refs], names, step, timeout_s)


def wait_one(ref, name: str, step: str, timeout_s: float) -> Any:
    return wait_all([ref], [name], step, timeout_s)[0]


def await_restart(actor, name: str, timeout_s: float, demand: dict) -> None:
    """Wait until Ray has (re)started ``actor`` (its ``ready()`` answers): a call made before Ray
    has noticed a death fails, so keep asking until the deadline. An actor whose ``demand``
    (its options: ``num_cpus``, ``num_gpus``, ``resources``) no live node meets would wait
    forever: ``ActorStranded`` once Ray has marked its node dead."""
    import ray

    deadline = time.monotonic() + timeout_s
    probe = actor.ready.remote()
    while True:
        if ray.wait([probe], timeout=RESTART_POLL_S)[0]:
            try:
                ray.get(probe)
                return
            except ray.exceptions.RayActorError as exc:
                if time.monotonic() > deadline:
                    raise ActorFailed(name, "restart",
                                      f"(not back within {timeout_s:.0f}s): {exc}") from exc
                time.sleep(RESTART_POLL_S)
                probe = actor.ready.remote()
        missing = missing_resources(demand)
        if missing:
            raise ActorStranded(name, missing, _wanted(demand))
        if time.monotonic() > deadline:
            raise RemoteTimeout(f"{name} did not finish 'restart' within {timeout_s:.0f}s "
                                f"(cluster.call_timeout_s)")


def _wanted(demand: dict) -> dict[str, float]:
    """Ray actor options as {resource: amount} that one node must have."""
    wanted = {"CPU": demand.get("num_cpus", 0), "GPU": demand.get("num_gpus", 0),
              **demand.get("resources", {})}
    return {resource: float(amount) for resource, amount in wanted.items() if amount}


def missing_resources(demand: dict) -> dict[str, float]:
    """What actor options ``demand`` ask for that no live node has in total: the resources no
    live node has enough of, or all of them when each is somewhere but no node has them all."""
    import ray

    wanted = _wanted(demand)
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    if any(all(node.get(r, 0.0) >= amount for r, amount in wanted.items()) for node in nodes):
        return {}
    absent = {r: amount for r, amount in wanted.items()
              if all(node.get(r, 0.0) < amount for node in nodes)}
    return absent or wanted

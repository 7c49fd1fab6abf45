"""Learner recovery: a dead learner group is rebuilt mid-run from the last complete checkpoint
(``Checkpoints``), and the loop redoes the iterations since."""
from __future__ import annotations

import logging
import time

from kimivl_rl.infra.remote import ActorFailed, LearnerGroupLost
from kimivl_rl.system.checkpoints import Checkpoints, resume_advice

log = logging.getLogger(__name__)


class LearnerRecovery:
    """Brings a dead learner group back mid-run, at most ``cluster.max_learner_restarts`` times:
    fresh ranks load the newest checkpoint (or keep the starting model when there is none yet),
    the sampler goes back to the same point, the rollout engines get those weights, and the
    loop redoes the iterations since. Past the limit, ``LearnerGroupLost`` says how to resume."""

    def __init__(self, checkpoints: Checkpoints):
        self.checkpoints = checkpoints
        self.actors, self.cfg, self.sampler = checkpoints.actors, checkpoints.cfg, checkpoints.sampler
        self.initial_sampler = self.sampler.state_dict()  # where to go back to before any checkpoint

    def recover(self, failure: ActorFailed) -> int:
        """Restart the learner group after ``failure`` (again if a new rank dies while it
        starts); the first iteration to run again."""
        while failure.role == "learner":
            try:
                return self._restart(failure)
            except ActorFailed as again:
                failure = again
        raise failure

    def _restart(self, failure: ActorFailed) -> int:
        restarts = self.actors.restarts
        if restarts["learner"] >= self.cfg.cluster.max_learner_restarts:
            raise LearnerGroupLost(self._given_up(failure)) from failure
        restarts["learner"] += 1
        started = time.perf_counter()
        self.actors.restart_learners()
        self.sampler.load_state_dict(self.initial_sampler)
        iteration = self.checkpoints.restore()
        log.warning("%s died during '%s': learner group restarted (%d of %d) from iteration %d "
                    "in %.1fs", failure.actor, failure.step, restarts["learner"],
                    self.cfg.cluster.max_learner_restarts, iteration, time.perf_counter() - started)
        return iteration

    def _given_up(self, failure: ActorFailed) -> str:
        return (f"{failure.actor} died during '{failure.step}' after the learner group had been "
                f"restarted {self.actors.restarts['learner']} times (cluster.max_learner_restarts="
                f"{self.cfg.cluster.max_learner_restarts}); {resume_advice(self.cfg)}. Why it died "
                f"is in the actor's log (Ray dashboard, or `ray logs` on the cluster).")

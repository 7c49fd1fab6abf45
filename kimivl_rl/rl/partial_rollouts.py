"""Kimi k1.5's partial rollouts, as pure bookkeeping: responses cut by the per-iteration token
budget (``rollout.token_budget``) wait here with their tokens and log-probabilities until a later
iteration continues them; a group trains once all its responses are done, and a group whose
oldest tokens have grown too stale is given up (``take_stale``). Repeat detection ends a
response that loops. ``kimivl_rl.system.collection`` does the generating and scoring."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from kimivl_rl.types import Sample

UNFINISHED = "budget"  # finish reason of a response cut by the token budget: to be continued
REPEAT = "repeat"      # finish reason of a response ended by repeat detection
MAX_NGRAM = 32         # longest loop repeat detection looks for, in tokens


def ends_in_repeat(token_ids: list[int], times: int, max_ngram: int = MAX_NGRAM) -> bool:
    """Whether the last ``n * times`` tokens are one n-gram repeated ``times`` times in a row,
    for some n <= ``max_ngram`` (``times`` 0: never)."""
    if times < 1:
        return False
    for n in range(1, max_ngram + 1):
        if n * times > len(token_ids):
            break
        tail = token_ids[len(token_ids) - n:]
        if all(token_ids[len(token_ids) - (k + 1) * n:len(token_ids) - k * n] == tail
               for k in range(1, times)):
            return True
    return False


def mark_segment(sample: Sample, *, partial: bool, max_new_tokens: int, stop_repeats: int) -> Sample:
    """A response's finish reason after a segment (``sample`` holds the whole response so far).
    Cut by a limit while looping: ``REPEAT``. Cut by the token budget (``partial``) below
    ``max_new_tokens``: ``UNFINISHED``. Otherwise vLLM's ("stop", or "length" at the limit)."""
    if sample.finish_reason != "length":
        return sample
    if ends_in_repeat(sample.token_ids, stop_repeats):
        return replace(sample, finish_reason=REPEAT)
    if partial and len(sample.token_ids) < max_new_tokens:
        return replace(sample, finish_reason=UNFINISHED)
    return sample


def extend(earlier: Sample, later: Sample) -> Sample:
    """A partial response followed by its continuation (which holds only the new tokens)."""
    return Sample(earlier.request_id, earlier.prompt_token_ids, earlier.token_ids + later.token_ids,
                  earlier.logprobs + later.logprobs, later.finish_reason, earlier.text + later.text)


@dataclass
class PartialGroup:
    """One prompt's k responses, some unfinished; ``version``: the policy that sampled their
    oldest tokens (their staleness once trained)."""
    prompt_index: int
    samples: list[Sample]
    version: int

    def unfinished(self) -> list[int]:
        return [i for i, s in enumerate(self.samples) if s.finish_reason == UNFINISHED]

    def tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.samples)


@dataclass
class PartialRollouts:
    """The groups waiting for their responses to finish, oldest first."""
    groups: list[PartialGroup] = field(default_factory=list)

    def take_stale(self, iteration: int, max_staleness: int) -> list[PartialGroup]:
        """Remove and return the groups that would lag the learner of ``iteration`` by more
        than ``max_staleness`` versions if trained there."""
        stale = [g for g in self.groups if iteration - g.version > max_staleness]
        self.groups = [g for g in self.groups if iteration - g.version <= max_staleness]
        return stale

    def state_dict(self) -> dict:
        return {"groups": [asdict(g) for g in self.groups]}

    @classmethod
    def from_state_dict(cls, state: dict) -> "PartialRollouts":
        return cls([PartialGroup(g["prompt_index"], [Sample(**s) for s in g["samples"]], g["version"])
                    for g in state["groups"]])

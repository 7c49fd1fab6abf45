"""Partial rollouts' bookkeeping (kimivl_rl/rl/partial_rollouts.py): repeat detection, finish
reasons after a segment, joining segments, the staleness rule, checkpoint state."""
from __future__ import annotations

import json

import pytest

from kimivl_rl.rl.partial_rollouts import (REPEAT, UNFINISHED, PartialGroup, PartialRollouts,
                                           ends_in_repeat, extend, mark_segment)
from kimivl_rl.types import Sample


def sample(tokens: list[int], finish: str = "length") -> Sample:
    return Sample("p", [1, 2], tokens, [-0.5] * len(tokens), finish, "x" * len(tokens))


@pytest.mark.parametrize("tokens, times, expected", [
    ([5, 7, 7, 7], 3, True),              # a 1-gram, three times
    ([5, 7, 7, 7], 4, False),             # only three
    ([9, 1, 2, 1, 2, 1, 2], 3, True),     # a 2-gram, three times
    ([1, 2, 3, 1, 2, 3, 1, 2], 2, True),  # "3 1 2" twice at the end ("1 2" is not)
    ([1, 2, 3, 1, 2, 4], 2, False),       # the tail differs
    ([1, 2, 1, 2], 0, False),             # off
    ([], 2, False),
])
def test_ends_in_repeat(tokens, times, expected):
    assert ends_in_repeat(tokens, times) is expected


def test_ends_in_repeat_looks_for_loops_up_to_max_ngram():
    loop = list(range(40))
    assert ends_in_repeat(loop * 2, 2, max_ngram=40)
    assert not ends_in_repeat(loop * 2, 2, max_ngram=32)


def test_mark_segment():
    mark = dict(partial=True, max_new_tokens=8, stop_repeats=3)
    assert mark_segment(sample([1, 2, 3], "stop"), **mark).finish_reason == "stop"
    assert mark_segment(sample([1, 2, 3]), **mark).finish_reason == UNFINISHED
    assert mark_segment(sample([1, 2, 3, 4, 5, 6, 7, 8]), **mark).finish_reason == "length"
    assert mark_segment(sample([1, 4, 4, 4]), **mark).finish_reason == REPEAT
    assert mark_segment(sample([1, 4, 4, 4], "stop"), **mark).finish_reason == "stop"  # it ended
    # Without a token budget a cut response is finished, whatever its length.
    assert mark_segment(sample([1, 2, 3]), **{**mark, "partial": False}).finish_reason == "length"


def test_extend_joins_tokens_logprobs_and_text_and_keeps_the_last_finish():
    first, second = sample([1, 2], UNFINISHED), Sample("q", [9], [3], [-0.1], "stop", "y")
    joined = extend(first, second)
    assert joined == Sample("p", [1, 2], [1, 2, 3], [-0.5, -0.5, -0.1], "stop", "xxy")


def test_stale_groups_are_taken_out_and_the_rest_kept():
    partial = PartialRollouts([PartialGroup(0, [sample([1], UNFINISHED)], version=3),
                               PartialGroup(1, [sample([1], UNFINISHED)], version=5)])
    # At iteration 6 with max_staleness 2: version 3 would lag by 3, version 5 by 1.
    assert [g.prompt_index for g in partial.take_stale(6, 2)] == [0]
    assert [g.prompt_index for g in partial.groups] == [1]
    assert partial.take_stale(7, 2) == [] and len(partial.groups) == 1


def test_state_round_trips_through_json():
    group = PartialGroup(4, [sample([1, 2], UNFINISHED), sample([3], "stop")], version=2)
    partial = PartialRollouts([group])
    again = PartialRollouts.from_state_dict(json.loads(json.dumps(partial.state_dict())))
    assert again == partial
    assert again.groups[0].unfinished() == [0] and again.groups[0].tokens() == 3


def test_an_iterations_metrics_count_responses_cut_at_the_limit_and_ended_as_loops():
    from kimivl_rl.rl.experience import Trajectory
    from kimivl_rl.system.controller import rollout_metrics

    finishes = ["stop", "length", REPEAT, REPEAT]
    metrics = rollout_metrics([Trajectory(0, [1], [2, 3], [-0.1, -0.1], f) for f in finishes], 0.0)
    assert (metrics["truncated_fraction"], metrics["repeat_fraction"]) == (0.25, 0.5)


class Rendered:
    """The one call of a processor that ``generation_requests`` makes: the chat's last text."""

    @staticmethod
    def apply_chat_template(messages, tokenize: bool, add_generation_prompt: bool) -> str:
        return messages[-1]["content"]


def test_continuations_ask_one_more_segment_of_each_unfinished_response_within_the_limit():
    """``rollout.token_budget=4`` of ``max_new_tokens=10``: a response 4 tokens long may grow by 4,
    one 8 long only by the 2 left; finished responses ask nothing. One sample each, whatever
    the call's n, behind the prompt's own text."""
    from kimivl_rl.config import load_config
    from kimivl_rl.data.rows import Example
    from kimivl_rl.system.collection import continuation_requests

    cfg = load_config(None, ["rollout.token_budget=4", "rollout.max_new_tokens=10", "rl.max_staleness=2"])
    prompts = [Example([{"role": "user", "content": f"q{i}"}], [], "1", None, None, f"f:{i}")
               for i in range(3)]
    waiting = [PartialGroup(2, [sample([1, 2, 3, 4], UNFINISHED), sample([5], "stop")], version=0),
               PartialGroup(0, [sample([6] * 8, UNFINISHED), sample([7] * 4, UNFINISHED)], version=1)]
    requests = continuation_requests(cfg, Rendered(), prompts, waiting)
    assert [(r.prompt, r.continuation, r.max_new_tokens, r.n) for r in requests] == [
        ("q2", [1, 2, 3, 4], 4, 1), ("q0", [6] * 8, 2, 1), ("q0", [7] * 4, 4, 1)]

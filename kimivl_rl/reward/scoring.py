"""Score batches of responses with a per-item time limit, in a worker process that can be killed.

Verifying a policy's answers means running sympy (or a user's code) on arbitrary text, and some
inputs never finish: ``\\boxed{9^{9^{9^{9^{9}}}}}`` asks for a number with more digits than
there are atoms in the universe. Threads cannot be interrupted and ``signal.alarm`` only works in
the main thread, so each item runs in a persistent worker process; when an item exceeds the
limit the worker is killed, the item scores 0 with the reason recorded, and a fresh worker picks
up the rest of the batch.
"""
from __future__ import annotations

import multiprocessing
import time
from dataclasses import replace
from functools import partial
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from types import TracebackType
from typing import Optional

from kimivl_rl.reward.contract import (RewardFn, RewardInput, RewardOutput, answer_only_reward,
                                       load_reward_fn)

STARTUP_TIMEOUT_S = 120.0  # imports only; generous because CPUs may be shared with training
ERROR_MESSAGE_CHARS = 500  # an exception message may quote the (huge) input
NO_REASON = "no reason given"  # a reward function's output without a reason
# Scoring this once at start-up imports sympy and compiles the parsers, so a worker's first item
# does not spend its time limit on imports.
_WARM_UP = RewardInput("\\boxed{\\frac{1}{2}}", "0.5")


def _resolve(reward_fn_path: Optional[str], numeric_tolerance: float) -> RewardFn:
    """The function a worker calls; the built-in gets the configured numeric tolerance."""
    if reward_fn_path is None:
        return partial(answer_only_reward, numeric_tolerance=numeric_tolerance)
    return load_reward_fn(reward_fn_path)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:ERROR_MESSAGE_CHARS]}"


def _checked(output: object) -> RewardOutput:
    """A plain RewardOutput with a score in [0, 1] and a reason ("no reason given" when the
    function gave none), or an exception saying what is wrong."""
    if not isinstance(output, RewardOutput):
        raise TypeError(f"reward function returned {type(output).__name__}, expected RewardOutput")
    score = float(output.score)
    if not 0.0 <= score <= 1.0:  # also rejects NaN
        raise ValueError(f"reward function returned score {score!r}, expected a value in [0, 1]")
    for name in ("reason", "extracted"):
        if not isinstance(getattr(output, name), (str, type(None))):
            raise TypeError(f"reward function returned a non-string {name}")
    return RewardOutput(score, output.reason or NO_REASON, output.extracted)


def score_one(fn: RewardFn, item: RewardInput) -> RewardOutput:
    """Call a reward function; an exception becomes score 0 with the error as the reason."""
    try:
        return _checked(fn(item))
    except Exception as exc:  # a broken verifier must not stop training, but must be visible
        return RewardOutput(0.0, f"verifier error: {_describe(exc)}")


def _worker(conn: Connection, reward_fn_path: Optional[str], numeric_tolerance: float) -> None:
    """Worker process: load the function, report readiness (or the load error), then serve."""
    try:
        fn = _resolve(reward_fn_path, numeric_tolerance)
        answer_only_reward(_WARM_UP)
    except Exception as exc:
        conn.send((type(exc).__name__, str(exc)))
        return
    conn.send(None)
    while True:
        try:
            item = conn.recv()
        except EOFError:  # the scorer closed or died
            return
        conn.send(score_one(fn, item))


class TimedScorer:
    """Scores RewardInputs one at a time in a worker process, each within ``timeout_s``.

    The worker is started (and the reward function loaded) in the constructor, so a bad
    ``reward_fn_path`` raises ValueError here rather than in the middle of training. The worker
    is a daemon process: a user reward function cannot start processes of its own.
    """

    def __init__(self, reward_fn_path: Optional[str] = None, timeout_s: float = 5.0,
                 numeric_tolerance: float = 1e-6, max_chars: int = 100_000) -> None:
        if timeout_s <= 0 or max_chars <= 0:
            raise ValueError(f"timeout_s and max_chars must be positive: {timeout_s}, {max_chars}")
        self.reward_fn_path = reward_fn_path
        self.timeout_s = float(timeout_s)
        self.numeric_tolerance = numeric_tolerance
        self.max_chars = max_chars
        self._context = multiprocessing.get_context("spawn")  # no fork of a threaded trainer
        self._proc: Optional[BaseProcess] = None
        self._conn: Optional[Connection] = None
        self._closed = False
        # Per item of the last batch: seconds from handing it to the worker until its output
        # (a worker restart before an item is not counted; a timed-out item shows the limit).
        self.last_seconds: list[float] = []
        self._start()

    def score_batch(self, items: list[RewardInput]) -> list[RewardOutput]:
        """One RewardOutput per item, in order; timeouts and errors score 0 with a reason."""
        if self._closed:
            raise RuntimeError("TimedScorer is closed")
        outputs, seconds = [], []
        for item in items:
            output, took = self._score(item)
            outputs.append(output)
            seconds.append(took)
        self.last_seconds = seconds
        return outputs

    @property
    def worker_pid(self) -> Optional[int]:
        """The process id of the current worker (None between a kill and the next item)."""
        return None if self._proc is None else self._proc.pid

    def close(self) -> None:
        """Stop the worker; the scorer cannot be used afterwards."""
        self._stop()
        self._closed = True

    def __enter__(self) -> TimedScorer:
        return self

    def __exit__(self, exc_type: Optional[type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self.close()

    def _score(self, item: RewardInput) -> tuple[RewardOutput, float]:
        """The item's output and the seconds it took in the worker."""
        if self._proc is None or not self._proc.is_alive():
            self._stop()
            self._start()  # the previous worker was killed or died between items
        assert self._conn is not None
        start = time.perf_counter()
        self._conn.send(self._truncate(item))
        if not self._conn.poll(self.timeout_s):
            took = time.perf_counter() - start
            self._stop()
            return RewardOutput(0.0, f"timeout after {self.timeout_s}s"), took
        try:
            output = self._conn.recv()
        except EOFError:  # the worker died: a crash in native code, memory, os._exit
            took = time.perf_counter() - start
            exit_code = self._exit_code()
            self._stop()
            return RewardOutput(0.0, f"worker crashed (exit code {exit_code})"), took
        return output, time.perf_counter() - start

    def _truncate(self, item: RewardInput) -> RewardInput:
        """Keep the LAST max_chars characters: the final answer is at the end of a response."""
        if len(item.response) <= self.max_chars and len(item.reference) <= self.max_chars:
            return item
        return replace(item, response=item.response[-self.max_chars:],
                       reference=item.reference[-self.max_chars:])

    def _start(self) -> None:
        parent_end, child_end = self._context.Pipe()
        self._proc = self._context.Process(
            target=_worker, args=(child_end, self.reward_fn_path, self.numeric_tolerance),
            name="reward-worker", daemon=True)
        self._proc.start()
        child_end.close()
        self._conn = parent_end
        if not parent_end.poll(STARTUP_TIMEOUT_S):
            self._stop()
            raise RuntimeError(f"reward worker did not start within {STARTUP_TIMEOUT_S}s")
        try:
            error = parent_end.recv()
        except EOFError:
            exit_code = self._exit_code()
            self._stop()
            raise RuntimeError(
                f"reward worker exited while starting (exit code {exit_code})") from None
        if error is not None:
            self._stop()
            kind, message = error
            if kind == "ValueError":  # load_reward_fn's message already names the path
                raise ValueError(message)
            raise RuntimeError(f"reward worker failed to start: {kind}: {message}")

    def _exit_code(self) -> Optional[int]:
        assert self._proc is not None
        self._proc.join(timeout=1.0)
        return self._proc.exitcode

    def _stop(self) -> None:
        """Kill the worker, if any; it holds no state worth a graceful shutdown."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.join()
        if self._conn is not None:
            self._conn.close()
        self._proc = self._conn = None

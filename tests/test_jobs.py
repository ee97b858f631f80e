"""The background job runner (:mod:`pruneviz.jobs`): progress and ETA, cancel following the library convention
(partial results kept, Cancelled leaves none), failures kept, results kept until fetched, owners isolated."""
import threading

import pytest

from pruneviz.jobs import CANCELLED, DONE, FAILED, RUNNING, JobRunner
from pruneviz.progress import Cancelled, context_of


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def stepper(steps: threading.Semaphore, n: int = 4, partial: bool = True):
    """A job of ``n`` steps, each waiting for the test to release it; cancelled: returns steps done (partial) or
    raises Cancelled (like scoring)."""
    def work(progress, cancel):
        ctx = context_of(progress, cancel)
        done = 0
        for i in range(n):
            assert steps.acquire(timeout=30)
            if cancel():
                if partial:
                    return {"done": done, "complete": False}
                raise Cancelled("stopped")
            done += 1
            ctx.step(done / n, f"step {done}/{n}")
        return {"done": done, "complete": True}
    return work


def wait_for(cond, timeout=10.0):
    import time

    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.005)


def test_progress_eta_and_result_kept_until_fetched():
    clock, steps = Clock(), threading.Semaphore(0)
    runner = JobRunner(clock=clock)
    job = runner.submit("me", "evaluation", "Evaluating", stepper(steps))
    s = job.snapshot()
    assert s.status == RUNNING and s.fraction == 0 and s.eta is None and not s.has_result
    clock.t += 10
    steps.release()
    wait_for(lambda: job.snapshot().fraction == 0.25)
    s = job.snapshot()
    assert s.message == "step 1/4" and s.elapsed == pytest.approx(10) and s.eta == pytest.approx(30)
    assert runner.fetch("me", job.id) is None  # still running: nothing to fetch
    steps.release(3)
    assert job.wait(30)
    s = job.snapshot()
    assert s.status == DONE and s.fraction == 1.0 and s.eta is None and s.has_result
    assert [j.id for j in runner.jobs("me")] == [job.id]  # kept until fetched
    got = runner.fetch("me", job.id)
    assert got.result == {"done": 4, "complete": True} and runner.jobs("me") == []


def test_progress_never_moves_backwards_and_ignores_junk():
    runner = JobRunner()
    gate = threading.Event()

    def work(progress, cancel):
        progress(0.6, "a")
        progress(0.2, "b")  # a later stage restarting at 0 keeps the bar
        progress(float("nan"), "c")
        progress("x", "d")
        gate.wait(30)

    job = runner.submit("me", "k", "K", work)
    wait_for(lambda: job.snapshot().message == "c")
    assert job.snapshot().fraction == 0.6
    gate.set()
    job.wait(30)


def test_cancel_keeps_a_partial_result_or_none_after_cancelled():
    runner, steps = JobRunner(), threading.Semaphore(0)
    partial = runner.submit("me", "sweep", "Sweep", stepper(steps, partial=True))
    steps.release()
    wait_for(lambda: partial.snapshot().fraction == 0.25)
    assert runner.cancel("me", partial.id)
    assert partial.snapshot().cancel_requested
    steps.release()
    assert partial.wait(30)
    s = partial.snapshot()
    assert s.status == CANCELLED and s.has_result and runner.fetch("me", partial.id).result == {
        "done": 1, "complete": False}
    assert not runner.cancel("me", partial.id)  # gone

    raising = runner.submit("me", "scoring", "Score", stepper(steps, partial=False))
    runner.cancel("me", raising.id)
    steps.release()
    assert raising.wait(30)
    s = raising.snapshot()
    assert s.status == CANCELLED and not s.has_result and runner.fetch("me", raising.id).result is None


def test_a_failure_is_kept_for_the_owner():
    runner = JobRunner()

    def work(progress, cancel):
        raise ValueError("bad setting")

    job = runner.submit("me", "k", "K", work)
    assert job.wait(30)
    s = job.snapshot()
    assert s.status == FAILED and s.error == "bad setting" and not s.has_result
    assert isinstance(runner.fetch("me", job.id).error, ValueError)


def test_owners_never_see_each_others_jobs():
    runner, steps = JobRunner(), threading.Semaphore(0)
    mine = runner.submit("alice", "evaluation", "A", stepper(steps, n=1))
    theirs = runner.submit("bob", "evaluation", "B", stepper(steps, n=1))
    assert [j.id for j in runner.jobs("alice")] == [mine.id] and [j.id for j in runner.jobs("bob")] == [theirs.id]
    assert runner.get("bob", mine.id) is None and not runner.cancel("bob", mine.id)
    assert not mine.snapshot().cancel_requested
    assert [j.id for j in runner.running("alice", "evaluation")] == [mine.id] and runner.running("alice", "x") == []
    steps.release(2)
    assert mine.wait(30) and theirs.wait(30)
    assert runner.fetch("bob", mine.id) is None and runner.fetch("alice", mine.id).result["done"] == 1
    assert runner.fetch("bob", theirs.id).result["done"] == 1
    with pytest.raises(ValueError):
        runner.submit("", "k", "K", lambda p, c: None)


def test_finished_jobs_nobody_fetches_are_forgotten():
    clock = Clock()
    runner = JobRunner(keep_seconds=60, clock=clock)
    old = runner.submit("me", "k", "old", lambda p, c: 1)
    assert old.wait(30)
    clock.t += 61
    new = runner.submit("me", "k", "new", lambda p, c: 2)
    assert new.wait(30)
    assert [j.id for j in runner.jobs("me")] == [new.id]

"""Background jobs: long library calls in worker threads, with progress, ETA, cancel and results kept until fetched.

A job is a function ``work(progress, cancel) -> result`` that follows :mod:`pruneviz.progress` (``progress(fraction,
message)``, ``cancel()`` polled between steps). :meth:`JobRunner.submit` runs it in a daemon thread and returns a
:class:`Job`; anyone holding the job's *owner* token can see its progress (:meth:`Job.snapshot`: fraction, message,
elapsed, ETA from elapsed / fraction), ask it to stop (:meth:`JobRunner.cancel`) and fetch its result once it is done
(:meth:`JobRunner.fetch`, which removes it). Owners never see each other's jobs.

How a job ends, following the library's cancel convention:

- ``done``: ``work`` returned;
- ``cancelled``: ``cancel()`` had answered True; a call with a meaningful partial result (a perplexity over the
  windows seen, the sweep points done) returned it and it is kept as the result; a call that raised
  :class:`pruneviz.progress.Cancelled` leaves no result;
- ``failed``: ``work`` raised; the exception is kept (``Job.error``) for the caller to show.

Worker threads run library code only: a UI collects everything a job needs first and applies the result in its
own thread (see :mod:`pruneviz.ui.jobs_panel`). :func:`runner` is the process-wide runner.
"""
from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .progress import Cancel, Cancelled, Progress

__all__ = ["Job", "JobRunner", "JobSnapshot", "RUNNING", "DONE", "CANCELLED", "FAILED", "runner"]

RUNNING, DONE, CANCELLED, FAILED = "running", "done", "cancelled", "failed"
KEEP_SECONDS = 6 * 3600  # finished jobs nobody fetched are forgotten after this long
_ids = itertools.count(1)


@dataclass(frozen=True)
class JobSnapshot:
    """A consistent view of one job at one moment (plain data for tables and panels)."""

    id: str
    owner: str
    kind: str
    label: str
    status: str
    fraction: float
    message: str
    elapsed: float
    eta: float | None  # seconds left, from elapsed / fraction (None before any progress or once finished)
    cancel_requested: bool
    has_result: bool
    error: str | None
    meta: dict = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.status != RUNNING


class Job:
    """One background job; its fields change under its lock (read them through :meth:`snapshot`)."""

    def __init__(self, owner: str, kind: str, label: str, work: Callable[[Progress, Cancel], Any],
                 meta: dict | None = None, clock: Callable[[], float] = time.monotonic):
        self.id = f"j{next(_ids)}"
        self.owner, self.kind, self.label, self.meta = owner, kind, label, dict(meta or {})
        self._work, self._clock = work, clock
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._done = threading.Event()
        self.status, self.fraction, self.message = RUNNING, 0.0, "starting…"
        self.started = clock()
        self.ended: float | None = None
        self.result: Any = None
        self.has_result = False
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None

    # ---- the callbacks handed to the work ---------------------------------------------------------------------------

    def progress(self, fraction: float, message: str = "") -> None:
        """The job's ``progress`` callback: fractions only move forward (a new stage restarting at 0 keeps the bar)."""
        try:
            f = min(max(float(fraction), 0.0), 1.0)
        except (TypeError, ValueError):
            return
        with self._lock:
            if f == f:  # not NaN
                self.fraction = max(self.fraction, f)
            if message:
                self.message = str(message)

    def cancelled(self) -> bool:
        """The job's ``cancel`` callback."""
        return self._cancel.is_set()

    def request_cancel(self) -> None:
        self._cancel.set()

    # ---- running ----------------------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            result = self._work(self.progress, self.cancelled)
        except Cancelled:
            self._finish(CANCELLED)
        except BaseException as e:  # noqa: BLE001 - kept for the owner to show
            self._finish(FAILED, error=e)
        else:
            self._finish(CANCELLED if self._cancel.is_set() else DONE, result=result, has_result=True)

    def _finish(self, status: str, result=None, has_result: bool = False, error: BaseException | None = None):
        with self._lock:
            self.status, self.result, self.has_result, self.error = status, result, has_result, error
            self.ended = self._clock()
            if status == DONE:
                self.fraction = 1.0
        self._done.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job has finished (True) or ``timeout`` seconds passed (False)."""
        return self._done.wait(timeout)

    def snapshot(self) -> JobSnapshot:
        with self._lock:
            now = self.ended if self.ended is not None else self._clock()
            elapsed = max(now - self.started, 0.0)
            eta = None
            if self.status == RUNNING and self.fraction > 0:
                eta = elapsed * (1.0 - self.fraction) / self.fraction
            return JobSnapshot(self.id, self.owner, self.kind, self.label, self.status, self.fraction, self.message,
                               elapsed, eta, self._cancel.is_set(), self.has_result,
                               None if self.error is None else (str(self.error) or type(self.error).__name__),
                               dict(self.meta))


class JobRunner:
    """Jobs by owner. Thread-safe; one runner serves every session of a process (:func:`runner`)."""

    def __init__(self, keep_seconds: float = KEEP_SECONDS, clock: Callable[[], float] = time.monotonic):
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}
        self.keep_seconds, self._clock = keep_seconds, clock

    def submit(self, owner: str, kind: str, label: str, work: Callable[[Progress, Cancel], Any],
               meta: dict | None = None) -> Job:
        """Start ``work(progress, cancel)`` in a daemon thread for ``owner``; returns the job at once."""
        if not owner:
            raise ValueError("a job needs an owner token")
        job = Job(owner, kind, label, work, meta, self._clock)
        with self._lock:
            self._forget_old()
            self._jobs[job.id] = job
        job.thread = threading.Thread(target=job._run, name=f"pruneviz-job-{job.id}-{kind}", daemon=True)
        job.thread.start()
        return job

    def _forget_old(self) -> None:
        now = self._clock()
        for jid, job in list(self._jobs.items()):
            if job.ended is not None and now - job.ended > self.keep_seconds:
                del self._jobs[jid]

    def jobs(self, owner: str) -> list[Job]:
        """``owner``'s jobs, oldest first (running and finished ones not yet fetched)."""
        with self._lock:
            return [j for j in self._jobs.values() if j.owner == owner]

    def snapshots(self, owner: str) -> list[JobSnapshot]:
        return [j.snapshot() for j in self.jobs(owner)]

    def get(self, owner: str, job_id: str) -> Job | None:
        """The job ``job_id`` if ``owner`` owns it (another owner's job is None, as if it did not exist)."""
        with self._lock:
            job = self._jobs.get(job_id)
        return job if job is not None and job.owner == owner else None

    def running(self, owner: str, kind: str | None = None) -> list[Job]:
        return [j for j in self.jobs(owner) if j.status == RUNNING and (kind is None or j.kind == kind)]

    def cancel(self, owner: str, job_id: str) -> bool:
        """Ask ``owner``'s job to stop after its current step; False when there is no such running job."""
        job = self.get(owner, job_id)
        if job is None or job.status != RUNNING:
            return False
        job.request_cancel()
        return True

    def fetch(self, owner: str, job_id: str) -> Job | None:
        """Take a finished job of ``owner`` out of the runner (its ``result`` / ``error`` with it); None while it
        runs or when it is not ``owner``'s."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job.owner != owner or job.status == RUNNING:
                return None
            return self._jobs.pop(job_id)

    def dismiss(self, owner: str, job_id: str) -> bool:
        """Forget a finished job without using its result."""
        return self.fetch(owner, job_id) is not None


_RUNNER = JobRunner()


def runner() -> JobRunner:
    """The process-wide runner."""
    return _RUNNER

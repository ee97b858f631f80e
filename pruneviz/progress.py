"""One progress and cancellation protocol for every long call (scoring, solver, evaluation, sweep, recovery, export).

- ``progress(fraction, message)``: ``fraction`` in [0, 1] of the whole call, ``message`` what is being done.
- ``cancel()``: polled between steps; True asks the call to stop at the next step.

What a cancelled call does depends only on whether it has a meaningful partial result:

- calls whose partial result is still a measurement (perplexity over the windows seen so far, a LoRA run's
  adapters after the steps taken, the points of a sweep done so far) return it, marked ``complete=False``;
- all others (scoring, the SlimGPT solver, surgery, export) raise :class:`Cancelled` and leave nothing behind.

Callers pass plain functions; :class:`Context` and :class:`Span` are the helpers long code uses to report.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

Progress = Callable[[float, str], None]
Cancel = Callable[[], bool]


class Cancelled(Exception):
    """Raised inside long work when the caller's ``cancel()`` returned True."""


@dataclass
class Context:
    """Progress reporting and cancellation of one call, as handed to a criterion or solver."""

    progress: Progress | None = None
    cancel: Cancel | None = None

    def cancelled(self) -> bool:
        return self.cancel is not None and bool(self.cancel())

    def step(self, fraction: float, message: str = "") -> None:
        """Report ``fraction`` done; raise :class:`Cancelled` if the caller asked to stop."""
        if self.cancelled():
            raise Cancelled(message or "cancelled")
        if self.progress is not None:
            self.progress(min(max(fraction, 0.0), 1.0), message)


@dataclass
class Span:
    """A slice ``[lo, hi]`` of a call's progress bar; ``ctx`` may be None (no reporting, no cancel)."""

    ctx: Context | None
    lo: float = 0.0
    hi: float = 1.0

    def step(self, fraction: float, message: str = "") -> None:
        if self.ctx is not None:
            self.ctx.step(self.lo + (self.hi - self.lo) * min(max(fraction, 0.0), 1.0), message)

    def sub(self, lo: float, hi: float) -> "Span":
        """The part ``[lo, hi]`` (fractions of this span) of this span."""
        width = self.hi - self.lo
        return Span(self.ctx, self.lo + width * lo, self.lo + width * hi)


def context_of(progress: Progress | None, cancel: Cancel | None = None) -> Context:
    """A :class:`Context` around plain ``progress`` / ``cancel`` callbacks."""
    return Context(progress=progress, cancel=cancel)


def counted(progress: Progress | None, what: str) -> Callable[[int, int], None] | None:
    """``progress`` fed from a ``(done, total)`` counter: ``what`` names the items ("window", "step")."""
    if progress is None:
        return None
    return lambda done, total: progress(done / max(total, 1), f"{what} {done}/{total}")

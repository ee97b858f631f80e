"""Long work inside a Streamlit run: a status box with a progress bar, a Cancel button, errors as messages.

Work runs in the script thread (worker threads must not call ``st.*``). When the user interacts with the page
during the work (the Cancel button, or anything else), Streamlit 1.67 stops the running script by raising a
control exception at its next ``st`` call, which here is always a progress update, and starts a new run at
once. :class:`Job` catches that exception inside the progress callback and answers ``True`` to the library's
``cancel()`` callbacks from then on, so the library stops after its current step and returns what it has (e.g. a
partial perplexity). Results reach the session through :func:`pruneviz.ui.state.save`, which queues them for the
session's next run when this run may no longer touch ``st.session_state``; the new run shows a "finishing" note
and refreshes when the old thread is done (:func:`pruneviz.ui.components.finishing_note`). Library errors are
shown with ``st.error`` (their text says what to do); anything unexpected is logged and shown as a one-line
message, never as a traceback.

When the page is closed or reloaded, the session is gone: :meth:`Job.cancelled` answers ``True`` as soon as
:func:`pruneviz.ui.state.session_alive` says so (checked at most every :data:`ALIVE_EVERY` seconds), so the work
stops after its current step instead of keeping a core busy for nobody; what it finished reaches the reloaded
page (:func:`pruneviz.ui.state.restore_work`).
"""
from __future__ import annotations

import logging
import time

import streamlit as st

from ..errors import PrunevizError, is_oom, oom_advice
from ..progress import Cancelled
from . import state
from .compat import ScriptControlException, StopException

log = logging.getLogger("pruneviz.app")
ALIVE_EVERY = 0.25  # seconds between two checks that the browser session is still there


def error_text(exc: BaseException) -> str:
    """A user-facing message for ``exc``: the library's advice, or a short description plus what to try."""
    if isinstance(exc, PrunevizError):
        return str(exc)
    if is_oom(exc):
        return str(oom_advice(exc, "running this step"))
    detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    return (f"Unexpected error ({type(exc).__name__}{': ' + detail if detail else ''}). Try smaller settings or "
            "reload the model; if it persists, report it with the server log.")


def show_error(exc: BaseException, where=st) -> None:
    """Render ``exc`` as an error message (logged with its traceback when it is not a library error)."""
    if not isinstance(exc, PrunevizError):
        log.error("unexpected error in the app", exc_info=exc)
    where.error(error_text(exc), icon=":material/error:")


class Job:
    """``with Job("Computing…", key="imp") as job:`` run work calling ``job.progress`` / ``job.cancelled``.

    After the block: ``job.ok`` is True if it finished, ``job.error`` holds a swallowed error. An interrupted job
    re-raises Streamlit's exception on exit (after queueing a notice), so the newer run proceeds.
    """

    def __init__(self, label: str, key: str, cancellable: bool = True, done_label: str | None = None,
                 cancel_note: str | None = None):
        self.label, self.key, self.cancellable = label, key, cancellable
        self.done_label = done_label
        self.cancel_note = cancel_note or f"{label.rstrip('…. ')}: stopped. Results finished before were kept."
        self.interrupt: BaseException | None = None
        self.error: BaseException | None = None
        self.ok = False
        self.gone = False  # the browser session ended (page closed or reloaded) while the job ran
        self._checked = 0.0

    def __enter__(self) -> "Job":
        self.sid = state.session_id()
        state.shared().busy[self.sid] = self.label.rstrip("…. ")
        self.box = st.status(self.label, expanded=True)
        with self.box:
            self.bar = st.progress(0.0, text="starting…")
            self._cancel_slot = st.empty()
            if self.cancellable:
                self._cancel_slot.button("Cancel", key=f"{self.key}_cancel", icon=":material/stop_circle:",
                                         help="Stop after the current step. What is already computed is kept.")
        return self

    def progress(self, fraction: float, text: str = "") -> None:
        """Progress callback ``(fraction in [0, 1], text)`` for pruneviz functions."""
        if self.interrupt is not None:
            return
        try:
            self.bar.progress(min(max(float(fraction), 0.0), 1.0), text=text or None)
        except ScriptControlException as e:  # the user clicked something: stop after this step
            self.interrupt = e

    def prefixed(self, prefix: str):
        """A progress callback ``(fraction, message)`` whose messages start with ``prefix``."""
        return lambda fraction, message="": self.progress(fraction, f"{prefix}{message}")

    def cancelled(self) -> bool:
        """Cancel callback for pruneviz functions: True once the user interrupted, or once the page that started
        the job was closed or reloaded."""
        if self.interrupt is None and self._session_gone():
            self.gone, self.interrupt = True, StopException()
        return self.interrupt is not None

    def _session_gone(self) -> bool:
        now = time.monotonic()
        if now - self._checked < ALIVE_EVERY:
            return False
        self._checked = now
        return not state.session_alive(self.sid)

    def note(self, text: str) -> None:
        """Update the status label (between steps)."""
        if self.interrupt is None:
            try:
                self.box.update(label=text, state="running", expanded=True)  # both explicit: see st.status
            except ScriptControlException as e:
                self.interrupt = e

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            return self._finish(exc)
        finally:
            state.shared().busy.pop(self.sid, None)

    def _finish(self, exc) -> bool:
        if isinstance(exc, ScriptControlException):
            return False
        if self.interrupt is not None:
            if self.gone or not state.session_alive(self.sid):
                state.notify(f"{self.label.rstrip('…. ')}: stopped because the page was reloaded or closed. Results "
                             "finished before were kept.", "⏹️")
            else:
                state.notify(self.cancel_note, "⏹️")
            raise self.interrupt
        self._cancel_slot.empty()
        if exc is None:
            self.ok = True
            self.box.update(label=self.done_label or self.label.rstrip("…") + " — done", state="complete",
                            expanded=False)
            return False
        self.error = exc
        if isinstance(exc, Cancelled):
            self.box.update(label=self.label.rstrip("…") + " — cancelled", state="error", expanded=False)
            return True
        self.box.update(label=self.label.rstrip("…") + " — failed", state="error", expanded=True)
        show_error(exc, self.box)
        return True

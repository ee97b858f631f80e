"""The jobs panel: long work in background threads (:mod:`pruneviz.jobs`), listed in the sidebar of every page.

The jobs are importance scoring, the SlimGPT solver, the recommended recipe, perplexity evaluation, LoRA recovery
and sweeps (started by :mod:`pruneviz.ui.background`). A page starts a job with :func:`submit`: everything the job
needs is collected in the script thread, the worker thread runs only library code and reports into the job
record, and the job's ``apply(session_state, result)`` runs later in a script thread of the owning session
(:func:`collect`, at the start of every run). The owner is a token kept in the session and in the URL
(``?owner=…``): a page reload keeps the URL, so the new session finds its jobs and collects their results; a job
stops only on Cancel, never because the page that started it went away. While a job runs, the panel redraws every
second (``st.fragment``) with progress, ETA and a Cancel button, and reruns the app once a job has finished.

A job that ends within :func:`inline_wait` seconds is collected in the same run, so quick work (a magnitude map
on a small model) shows its result at once.
"""
from __future__ import annotations

import os
import re
import secrets
import time

import streamlit as st

from ..jobs import CANCELLED, DONE, FAILED, RUNNING, Job, JobSnapshot, runner
from . import state
from .compat import ScriptControlException
from .work import error_text, show_error

OWNER_PARAM = "owner"
ENV_WAIT = "PRUNEVIZ_JOB_WAIT"
INLINE_WAIT = 2.0  # seconds a run waits for a job it started before leaving it to the panel ($PRUNEVIZ_JOB_WAIT)
LOG_LIMIT = 5
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{16,64}$")


def owner() -> str:
    """This session's job owner token: from the URL on a reload, else new; kept in the URL."""
    ss = st.session_state
    tok = ss.get("job_owner")
    if tok is None:
        given = st.query_params.get(OWNER_PARAM)
        tok = given if isinstance(given, str) and _TOKEN.match(given) else secrets.token_urlsafe(16)
        ss["job_owner"] = tok
    if st.query_params.get(OWNER_PARAM) != tok:
        st.query_params[OWNER_PARAM] = tok
    return tok


def inline_wait() -> float:
    """Seconds a run waits for a job it started: ``$PRUNEVIZ_JOB_WAIT`` or :data:`INLINE_WAIT`."""
    try:
        return max(float(os.environ.get(ENV_WAIT, "") or INLINE_WAIT), 0.0)
    except ValueError:
        return INLINE_WAIT


def running(kind: str) -> JobSnapshot | None:
    """This session's running job of ``kind`` (None when there is none)."""
    jobs = runner().running(owner(), kind)
    return jobs[0].snapshot() if jobs else None


def submit(kind: str, label: str, work, apply, wait: float | None = None) -> Job | None:
    """Start ``work(progress, cancel)`` in the background for this session; ``apply(session_state, result)`` stores
    its result (or partial result) later. One job of a kind at a time per session (None, with a message, when one
    runs). Waits up to :data:`INLINE_WAIT` seconds and collects it at once when it is that quick; otherwise reruns
    so the panel shows it."""
    tok = owner()
    if runner().running(tok, kind):
        st.warning(f"A {kind} job is already running (see Jobs in the sidebar): cancel it or wait for it.",
                   icon=":material/hourglass_top:")
        return None
    job = runner().submit(tok, kind, label, work, meta={"apply": apply, "model": state.session_spec().key,
                                                        "source": state.session_spec().source})
    if job.wait(inline_wait() if wait is None else wait):
        collect(inline=job.id)
        return job
    st.rerun()
    return job  # pragma: no cover - st.rerun raises


def finished_here(job: Job | None) -> bool:
    """True when ``job`` (what :func:`submit` returned) finished within this run and its result was stored without
    error: a page that drew the old state above the button reruns to show the new one."""
    return job is not None and job.status == DONE and job.error is None


def busy_note(snap: JobSnapshot, then: str = "") -> None:
    """The caption next to a start button while its job runs (the button is disabled: one job of a kind at a
    time): how far it is, its last message, where to follow and cancel it, and ``then`` (what happens at the end)."""
    st.caption(f":material/hourglass_top: {snap.label}: {snap.fraction:.0%}" +
               (f" · {snap.message}" if snap.message else "") +
               " — one at a time; progress, ETA and Cancel: Jobs in the sidebar." + (f" {then}" if then else ""))


def collect(inline: str | None = None) -> list[JobSnapshot]:
    """Apply the results of this session's finished jobs made on its current model; returns their snapshots. The
    job ``inline`` (just started by this run) shows its error here; others go to the panel's log."""
    tok, spec = owner(), state.session_spec()
    out = []
    if st.session_state.get("model_spec") is None:  # no model in the session yet: results wait for it
        return out
    for job in runner().jobs(tok):
        if job.status == RUNNING or job.meta.get("model") != spec.key:
            continue
        job = runner().fetch(tok, job.id)
        if job is None:
            continue
        snap = job.snapshot()
        out.append(snap)
        if job.has_result:
            try:
                job.meta["apply"](st.session_state, job.result)
            except ScriptControlException:
                raise
            except Exception as e:  # noqa: BLE001 - a result that cannot be stored: say so
                job.error, snap = e, _failed(snap, e)
        if job.error is not None:
            if inline == job.id:
                show_error(job.error)
            else:
                _log(snap, error_text(job.error))
        else:
            _log(snap, None)
            if inline != job.id:
                st.toast(f"{job.label}: {'done' if snap.status == DONE else 'stopped; partial results kept'}.",
                         icon="✅" if snap.status == DONE else "⏹️")
    return out


def _failed(snap: JobSnapshot, e: BaseException) -> JobSnapshot:
    from dataclasses import replace

    return replace(snap, status=FAILED, error=str(e))


def _log(snap: JobSnapshot, error: str | None) -> None:
    log = st.session_state.setdefault("job_log", [])
    log.append({"label": snap.label, "status": snap.status, "seconds": snap.elapsed, "error": error,
                "time": time.strftime("%H:%M:%S")})
    del log[:-LOG_LIMIT]


def eta_text(snap: JobSnapshot) -> str:
    if snap.eta is None:
        return "estimating…"
    s = snap.eta
    return f"about {s:.0f} s left" if s < 90 else f"about {s / 60:.1f} min left"


def panel() -> None:
    """The sidebar's Jobs section: collect finished results, then list running jobs (live) and recent ones."""
    collect()
    snaps = runner().snapshots(owner())
    log = st.session_state.get("job_log") or []
    if not snaps and not log:
        return
    st.subheader("Jobs", anchor=False)
    if any(s.status == RUNNING for s in snaps):
        live_jobs()
    else:
        _draw(snaps)
    for entry in log[::-1]:
        icon = {DONE: "✅", CANCELLED: "⏹️", FAILED: "⚠️"}.get(entry["status"], "•")
        st.caption(f"{icon} {entry['time']} · {entry['label']} · {entry['status']} in {entry['seconds']:.0f} s")
        if entry["error"]:
            st.error(entry["error"], icon=":material/error:")
    if log and st.button("Clear finished", key="jobs_clear", icon=":material/clear_all:", width="stretch"):
        st.session_state["job_log"] = []
        st.rerun()


@st.fragment(run_every=1.0)
def live_jobs() -> None:
    """Progress of the running jobs, redrawn every second; the app reruns (and collects) when one has finished."""
    snaps = runner().snapshots(owner())
    if not any(s.status == RUNNING for s in snaps) or any(s.status != RUNNING and s.meta.get("model")
                                                          == state.session_spec().key for s in snaps):
        st.rerun(scope="app")
    _draw(snaps)


def _draw(snaps: list[JobSnapshot]) -> None:
    tok = owner()
    for s in snaps:
        with st.container(border=True):
            if s.status == RUNNING:
                text = f"{s.message} · {eta_text(s)}" + (" · stopping after this step" if s.cancel_requested
                                                          else "")
                st.progress(s.fraction, text=f"**{s.label}** — {text}")
                st.button("Cancel", key=f"jobs_cancel_{s.id}", icon=":material/stop_circle:",
                          disabled=s.cancel_requested, on_click=runner().cancel, args=(tok, s.id),
                          help="Stop after the current step; what is already done is kept where it means "
                               "something (perplexity, sweep points, LoRA steps).")
            else:
                st.caption(f"**{s.label}** finished ({s.status}) on {s.meta.get('source')}: load that model to "
                           "collect its results.")
                st.button("Dismiss", key=f"jobs_dismiss_{s.id}", on_click=runner().dismiss, args=(tok, s.id))

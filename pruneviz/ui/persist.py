"""The app's history written through to the run store (:mod:`pruneviz.runs`) and read back for a new session.

Each loaded model gets its run key once per process (:func:`register`, from :func:`pruneviz.runs.model_key`).
:func:`pruneviz.ui.state.add_history`, :func:`record_eval` and :func:`record_export` write every history entry,
evaluation and export of the session's model through to the store; :func:`restore` fills an empty history and
evaluation list of a session from it, so a reload, a new browser session or a server restart shows what was done
on that model. A store that cannot be written (a damaged file, a full disk) never stops the app: the session keeps
its in-memory history and :func:`problem` says what went wrong.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import fields

from ..errors import PrunevizError
from ..runs import Run, RunStore, default_path, model_key
from . import state

log = logging.getLogger("pruneviz.app")

_lock = threading.Lock()
_KEYS: dict[str, tuple[str, str]] = {}  # spec key -> (run key, model name)
_STORES: dict[str, RunStore] = {}
_PROBLEM: dict[str, str] = {}  # store path -> last error text


def store() -> RunStore:
    """The run store at :func:`pruneviz.runs.default_path` (one object per path; it opens a connection per call)."""
    path = str(default_path())
    with _lock:
        if path not in _STORES:
            _STORES[path] = RunStore(path)
        return _STORES[path]


def problem() -> str | None:
    """The last error of the current store (None when its last use worked)."""
    return _PROBLEM.get(str(default_path()))


def _guard(what: str, fn, default=None):
    path = str(default_path())
    try:
        out = fn()
    except PrunevizError as e:
        log.warning("run store: %s failed: %s", what, e)
        _PROBLEM[path] = str(e)
        return default
    _PROBLEM.pop(path, None)
    return out


def register(spec: state.ModelSpec, loaded) -> str:
    """The run key of the session's model ``loaded`` (loaded for ``spec``), computed once per process."""
    with _lock:
        hit = _KEYS.get(spec.key)
    if hit is None:
        hit = (model_key(loaded.model), str(loaded.name))
        with _lock:
            _KEYS[spec.key] = hit
    return hit[0]


def key_of(ss) -> tuple[str, str] | None:
    """(run key, model name) of the model of session state ``ss`` (None before it was registered)."""
    spec = ss.get("model_spec")
    return _KEYS.get(spec.key) if spec is not None else None


# ---- writing ------------------------------------------------------------------------------------------------------

HISTORY_METRICS = ("params", "dense_ppl", "ppl", "lora_ppl", "protocol")


def record_history(entry, ss) -> int | None:
    """Write a :class:`~pruneviz.ui.state.HistoryEntry` (one run per plan: later metrics update it)."""
    key = key_of(ss)
    if key is None:
        return None
    metrics = {k: getattr(entry, k) for k in HISTORY_METRICS}
    extra = {"criterion": entry.criterion, "strategy": entry.strategy, "settings": entry.settings,
             "edits": entry.edits}
    return _guard("writing the history", lambda: store().record(
        key[0], "plan", json.loads(entry.plan_json) if isinstance(entry.plan_json, str) else entry.plan_json,
        metrics, entry.summary, extra=extra, model_name=key[1], merge=True))


state.HISTORY_SINKS.append(record_history)


def record_eval(record, plan_json, ss) -> int | None:
    """Write an :class:`~pruneviz.ui.state.EvalRecord` of the plan ``plan_json`` (a Plan, its dict or JSON)."""
    key = key_of(ss)
    if key is None:
        return None
    metrics = {f.name: getattr(record, f.name) for f in fields(record) if f.name != "sha"}
    label = f"{record.protocol} on {record.text}" + ("" if record.complete else " (partial)")
    return _guard("writing an evaluation", lambda: store().record(key[0], "evaluation", _plan(plan_json), metrics,
                                                                 label, model_name=key[1]))


def record_export(plan, report, ss) -> int | None:
    """Write an export (:class:`pruneviz.export.ExportReport`) of ``plan``."""
    key = key_of(ss)
    if key is None:
        return None
    metrics = {k: v for k, v in report.to_dict().items() if k in ("folder", "format", "reload_max_abs_diff",
                                                                  "remote_code_max_abs_diff", "ok", "seconds",
                                                                  "params")}
    return _guard("writing an export", lambda: store().record(key[0], "export", plan, metrics,
                                                             f"{report.format} → {report.folder}",
                                                             model_name=key[1]))


def record_sweep(points, ss) -> int | None:
    """Write the finished points of a sweep as one run (its points' metrics and plan shas)."""
    key = key_of(ss)
    rows = [p.row() for p in points]
    if key is None or not rows:
        return None
    crits = sorted({r.get("criterion", "") for r in rows} - {"dense"})
    return _guard("writing a sweep", lambda: store().record(
        key[0], "sweep", None, {"points": len(rows), "criteria": ", ".join(crits)},
        f"sweep: {', '.join(crits)} ({len(rows)} points)", extra={"rows": rows}, model_name=key[1]))


def _plan(plan_json):
    if isinstance(plan_json, str):
        return json.loads(plan_json)
    return plan_json


# ---- reading back -------------------------------------------------------------------------------------------------

def runs_for(ss, kind: str | None = None) -> list[Run] | None:
    """The stored runs of the session's model (None when the store cannot be read: see :func:`problem`)."""
    key = key_of(ss)
    if key is None:
        return []
    return _guard("reading runs", lambda: store().list(key[0], kind))


def history_of(run: Run, n: int) -> state.HistoryEntry:
    """The History table row of a stored ``plan`` run."""
    m, x = run.metrics, run.extra
    return state.HistoryEntry(run.plan_sha or "", run.label or run.summary(), str(x.get("criterion") or "manual"),
                              str(x.get("strategy") or "manual"), json.dumps(run.plan, sort_keys=True),
                              str(x.get("settings") or "null"), str(x.get("edits") or "[]"), n,
                              time.strftime("%m-%d %H:%M", time.localtime(run.updated)), m.get("params"),
                              m.get("dense_ppl"), m.get("ppl"), m.get("lora_ppl"), m.get("protocol"))


def eval_of(run: Run) -> state.EvalRecord | None:
    """The :class:`~pruneviz.ui.state.EvalRecord` of a stored evaluation run (None if it does not read as one)."""
    names = {f.name for f in fields(state.EvalRecord)}
    values = {k: v for k, v in run.metrics.items() if k in names}
    values["sha"] = run.plan_sha or ""
    for k in ("dense_ppl", "pruned_ppl"):  # NaN was stored as None
        values[k] = float("nan") if values.get(k) is None else values[k]
    try:
        return state.EvalRecord(**values)
    except TypeError:
        return None


def restore(ss) -> int:
    """Fill the empty history and evaluations of session state ``ss`` from the store (once per model and
    session); returns how many runs were read."""
    key = key_of(ss)
    done = ss.setdefault("runs_restored", set())
    if key is None or key[0] in done:
        return 0
    done.add(key[0])
    n = 0
    if not ss.get("history"):
        runs = _guard("reading the history", lambda: store().list(key[0], "plan"), []) or []
        ss["history"] = [history_of(r, i + 1) for i, r in enumerate(runs)]
        n += len(runs)
    if not ss.get("evals"):
        runs = _guard("reading evaluations", lambda: store().list(key[0], "evaluation"), []) or []
        ss["evals"] = [e for e in (eval_of(r) for r in runs) if e is not None]
        n += len(runs)
    return n


def plan_run_id(ss, plan) -> int | None:
    """The id of the stored run of ``plan`` on the session's model (for the URL), None when it was not stored."""
    key = key_of(ss)
    if key is None or plan is None or plan.is_empty():
        return None
    sha = plan.sha256()
    run = _guard("finding the plan", lambda: store().find(key[0], sha, "plan") or store().find(key[0], sha))
    return run.id if run is not None else None


def add_eval(ss, record, plan_json) -> None:
    """Append ``record`` to the session's evaluations and write it through (once: a queued update may run twice)."""
    evals = ss.setdefault("evals", [])
    if any(x is record for x in evals):
        return
    evals.append(record)
    record_eval(record, plan_json, ss)

"""Runs that persist: the plans, evaluations, exports and sweeps made on a model, in an SQLite file.

The store lives in the user's cache (``<cache>/runs.sqlite``, see :func:`pruneviz.loading.cache_dir`;
``$PRUNEVIZ_RUNS`` names another file). Every run belongs to a *model key* (:func:`model_key`: the model's name
plus a fingerprint of its geometry and weights, so two checkpoints with the same name never share runs) and holds

- ``kind``: ``plan`` (a configuration tried), ``evaluation``, ``export`` or ``sweep``;
- ``plan``: the plan as :meth:`pruneviz.plan.Plan.to_dict` (None for a sweep over many plans);
- ``metrics``: JSON numbers and strings (perplexities, parameters, the export's folder, ...);
- ``label`` and ``notes``: the user's words (a plan's summary by default).

Many sessions and processes may write at once: the file is in WAL mode with a busy timeout, every write is one
transaction. A file that is not a pruneviz store (or is damaged) raises :class:`RunStoreError` saying what to do;
pruneviz never deletes or rewrites it. Only :meth:`RunStore.delete`, asked for one run by its id, removes data.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from .errors import PlanError, PrunevizError

__all__ = ["ENV_RUNS", "KINDS", "SCHEMA_VERSION", "Run", "RunStore", "RunStoreError", "default_path", "model_key",
           "plan_of_run"]

ENV_RUNS = "PRUNEVIZ_RUNS"
KINDS = ("plan", "evaluation", "export", "sweep")
SCHEMA_VERSION = 1
FORMAT = "pruneviz-runs"
BUSY_MS = 15_000

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS pruneviz_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    model_key TEXT NOT NULL,
    model_name TEXT NOT NULL DEFAULT '',
    kind TEXT NOT NULL CHECK (kind IN ({", ".join(repr(k) for k in KINDS)})),
    created REAL NOT NULL,
    updated REAL NOT NULL,
    plan_sha TEXT,
    plan_json TEXT,
    metrics TEXT NOT NULL DEFAULT '{{}}',
    extra TEXT NOT NULL DEFAULT '{{}}',
    label TEXT NOT NULL DEFAULT '',
    notes TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS runs_by_model ON runs (model_key, kind, plan_sha);
"""


class RunStoreError(PrunevizError):
    """The run store cannot be opened or read (a foreign or damaged file, a newer schema, a missing run)."""


def _is_busy(e: BaseException) -> bool:
    """An SQLite error that says another connection holds the lock (not a damaged or foreign file)."""
    return isinstance(e, sqlite3.OperationalError) and ("locked" in str(e) or "busy" in str(e))


def default_path() -> pathlib.Path:
    """``$PRUNEVIZ_RUNS`` or ``<pruneviz cache>/runs.sqlite``."""
    env = os.environ.get(ENV_RUNS, "").strip()
    if env:
        return pathlib.Path(env).expanduser()
    from .loading import cache_dir

    return cache_dir() / "runs.sqlite"


def model_key(model) -> str:
    """The key runs of ``model`` are stored under: its name and a fingerprint of its geometry and weight probe
    (:class:`pruneviz.plan.BaseIdentity`); an exported, already pruned checkpoint is fingerprinted by the plan it
    records and its own weights."""
    from .plan import BaseIdentity, weight_probe

    cfg = model.config
    name = str(getattr(cfg, "_name_or_path", "") or getattr(cfg, "model_type", "") or "model")
    try:
        ident = BaseIdentity.of(model)
        payload: dict = {"geometry": ident.geometry.to_dict(), "probe": list(ident.probe)}
    except PlanError:  # already pruned: no dense geometry of its own
        payload = {"exported": str(getattr(cfg, "pruneviz_plan_sha256", "") or ""), "probe": list(weight_probe(model))}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    return f"{name}#{digest}"


def _finite(value):
    """JSON-safe: NaN and infinities become None (SQLite JSON and browsers reject them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _dumps(value) -> str:
    return json.dumps(_finite(value if value is not None else {}), sort_keys=True, allow_nan=False, default=str)


@dataclass(frozen=True)
class Run:
    """One stored run (plain data; ``plan`` is the plan's dict or None)."""

    id: int
    model_key: str
    model_name: str
    kind: str
    created: float
    updated: float
    plan_sha: str | None
    plan: dict | None
    metrics: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    label: str = ""
    notes: str = ""

    @property
    def when(self) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.updated))

    def summary(self) -> str:
        """The plan's one-line summary (or the label when there is no plan)."""
        if self.plan is None:
            return self.label or self.kind
        try:
            from .plan import Plan

            plan = Plan.from_dict(self.plan)
        except PrunevizError:
            return self.label or "(unreadable plan)"
        return "nothing removed" if plan.is_empty() else plan.summary()

    def to_dict(self) -> dict:
        return {"id": self.id, "model_key": self.model_key, "model_name": self.model_name, "kind": self.kind,
                "created": self.created, "updated": self.updated, "plan_sha": self.plan_sha, "plan": self.plan,
                "metrics": self.metrics, "extra": self.extra, "label": self.label, "notes": self.notes}


def plan_of_run(run: Run, model=None):
    """The :class:`pruneviz.plan.Plan` stored in ``run``, validated against ``model`` when given (as a plan for the
    dense base: no surgery). Raises PlanError saying which run and what does not fit."""
    from .plan import Plan

    if run.plan is None:
        raise PlanError(f"run #{run.id} ({run.kind}) stores no single plan; pick a plan, evaluation or export run")
    try:
        plan = Plan.from_dict(run.plan)
        return plan if model is None else plan.validate(model, physical=False)
    except PlanError as e:
        raise PlanError(f"run #{run.id} (made on {run.model_name or run.model_key}) does not fit the loaded model: "
                        f"{e.message}", "Load the model it was made for, then load the plan again.") from e


class RunStore:
    """The run store at ``path`` (default :func:`default_path`); opened (and created) on first use."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = pathlib.Path(path).expanduser() if path is not None else default_path()
        self._ready = False

    # ---- connection -----------------------------------------------------------------------------------------------

    def _problem(self, e: BaseException) -> RunStoreError:
        return RunStoreError(
            f"The run store {self.path} cannot be read ({e}). pruneviz left the file untouched.",
            f"If it is damaged or not pruneviz's, move it away (for example rename it to {self.path.name}.bak); "
            f"pruneviz then starts a new store there. Or set ${ENV_RUNS} to another file.")

    def _connect(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=BUSY_MS / 1000, isolation_level=None)
        except (OSError, sqlite3.Error) as e:
            raise RunStoreError(f"The run store {self.path} cannot be opened ({e}).",
                                f"Check that the folder is writable, or set ${ENV_RUNS} to another file.") from e
        try:
            conn.execute(f"PRAGMA busy_timeout={BUSY_MS}")
            if not self._ready:
                self._check_and_create_retrying(conn)
                self._ready = True
        except sqlite3.DatabaseError as e:
            conn.close()
            raise self._error_of(e) from e
        except BaseException:
            conn.close()
            raise
        return conn

    def _error_of(self, e: sqlite3.DatabaseError) -> RunStoreError:
        """What an SQLite error means for the user: a lock held past the busy timeout, or an unreadable file."""
        if not _is_busy(e):
            return self._problem(e)
        return RunStoreError(f"The run store {self.path} stayed locked by another process for {BUSY_MS // 1000} s "
                             f"({e}).", "Retry; if it persists, close other pruneviz processes.")

    def _check_and_create_retrying(self, conn: sqlite3.Connection) -> None:
        """:meth:`_check_and_create`, retried while another connection holds the lock. Switching a new file to WAL
        needs an exclusive lock, and SQLite answers SQLITE_BUSY at once there instead of calling the busy handler,
        so two sessions creating the store at the same moment would otherwise see "database is locked". Retries
        with a growing pause for up to ``BUSY_MS``; the retry re-reads the tables, so the store the other
        connection created is found, not created again."""
        deadline, pause = time.monotonic() + BUSY_MS / 1000, 0.005
        while True:
            try:
                return self._check_and_create(conn)
            except sqlite3.OperationalError as e:
                if not _is_busy(e) or time.monotonic() + pause > deadline:
                    raise
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                time.sleep(pause)
                pause = min(2 * pause, 0.25)

    def _check_and_create(self, conn: sqlite3.Connection) -> None:
        """Refuse a foreign or newer file; create the tables in an empty (new) one."""
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if tables and "pruneviz_meta" not in tables:
            shown = ", ".join(sorted(t for t in tables if not t.startswith("sqlite_"))[:5])
            raise RunStoreError(
                f"{self.path} is an SQLite database but not a pruneviz run store (it holds tables: {shown}). "
                "pruneviz left it untouched.",
                f"Set ${ENV_RUNS} to another file, or move this one away if it is in pruneviz's cache by mistake.")
        if "pruneviz_meta" in tables:
            meta = dict(conn.execute("SELECT key, value FROM pruneviz_meta").fetchall())
            if meta.get("format") != FORMAT:
                raise RunStoreError(f"{self.path} has a pruneviz_meta table but is not a pruneviz run store.",
                                    f"Set ${ENV_RUNS} to another file.")
            version = int(meta.get("schema_version", "0") or 0)
            if version > SCHEMA_VERSION:
                raise RunStoreError(
                    f"{self.path} was written by a newer pruneviz (run store schema {version}; this one reads "
                    f"{SCHEMA_VERSION}). It was left untouched.",
                    f"Upgrade pruneviz, or set ${ENV_RUNS} to another file for this version.")
            if "runs" in tables and version == SCHEMA_VERSION:
                return
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()
        if mode is None or str(mode[0]).lower() != "wal":  # e.g. a network file system without shared memory
            conn.execute("PRAGMA journal_mode=DELETE")
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in (x.strip() for x in _SCHEMA.split(";")):
                if statement:
                    conn.execute(statement)
            conn.execute("INSERT OR IGNORE INTO pruneviz_meta (key, value) VALUES ('format', ?)", (FORMAT,))
            conn.execute("INSERT OR REPLACE INTO pruneviz_meta (key, value) VALUES ('schema_version', ?)",
                         (str(SCHEMA_VERSION),))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _run(self, fn):
        """``fn(conn)`` on a fresh connection; SQLite errors become :class:`RunStoreError`."""
        conn = self._connect()
        try:
            return fn(conn)
        except sqlite3.DatabaseError as e:
            raise self._error_of(e) from e
        finally:
            conn.close()

    # ---- rows -----------------------------------------------------------------------------------------------------

    @staticmethod
    def _row(r) -> Run:
        return Run(int(r[0]), r[1], r[2], r[3], float(r[4]), float(r[5]), r[6],
                   json.loads(r[7]) if r[7] else None, json.loads(r[8] or "{}"), json.loads(r[9] or "{}"),
                   r[10] or "", r[11] or "")

    _COLS = "id, model_key, model_name, kind, created, updated, plan_sha, plan_json, metrics, extra, label, notes"

    # ---- API ------------------------------------------------------------------------------------------------------

    def record(self, model_key: str, kind: str, plan=None, metrics: Mapping | None = None, label: str = "",
               notes: str = "", extra: Mapping | None = None, model_name: str = "", merge: bool = False) -> int:
        """Store one run and return its id. ``plan``: a :class:`pruneviz.plan.Plan`, its dict, or None.

        With ``merge`` an existing run of the same model, kind and plan is updated instead (``metrics`` and
        ``extra`` are merged into its own, values that are None leave the stored ones; label replaced when
        given): the app's history keeps one row per plan that way."""
        if kind not in KINDS:
            raise RunStoreError(f"unknown run kind {kind!r}; use one of {', '.join(KINDS)}")
        if not model_key:
            raise RunStoreError("a run needs the key of the model it belongs to (pruneviz.runs.model_key)")
        plan_dict, sha = _plan_parts(plan)
        plan_text = json.dumps(plan_dict, sort_keys=True) if plan_dict is not None else None
        metrics, extra = dict(metrics or {}), dict(extra or {})
        now = time.time()

        def write(conn):
            conn.execute("BEGIN IMMEDIATE")  # read-merge-write is one transaction: no lost update between writers
            try:
                row = None
                if merge and sha is not None:
                    row = conn.execute(f"SELECT {self._COLS} FROM runs WHERE model_key=? AND kind=? AND plan_sha=? "
                                       "ORDER BY id DESC LIMIT 1", (model_key, kind, sha)).fetchone()
                if row is not None:
                    old = self._row(row)
                    new_metrics = {**old.metrics, **{k: v for k, v in metrics.items() if v is not None}}
                    new_extra = {**old.extra, **{k: v for k, v in extra.items() if v is not None}}
                    conn.execute("UPDATE runs SET updated=?, metrics=?, extra=?, label=?, notes=? WHERE id=?",
                                 (now, _dumps(new_metrics), _dumps(new_extra), label or old.label,
                                  notes or old.notes, old.id))
                    run_id = old.id
                else:
                    cur = conn.execute(
                        "INSERT INTO runs (model_key, model_name, kind, created, updated, plan_sha, plan_json, "
                        "metrics, extra, label, notes) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (model_key, model_name or model_key.split("#")[0], kind, now, now, sha, plan_text,
                         _dumps(metrics), _dumps(extra), label, notes))
                    run_id = int(cur.lastrowid)
                conn.execute("COMMIT")
                return run_id
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

        return self._run(write)

    def list(self, model_key: str | None = None, kind: str | None = None, limit: int = 1000) -> list[Run]:
        """Runs (of ``model_key`` and ``kind`` when given), oldest first, at most the ``limit`` newest."""
        where, args = [], []
        if model_key is not None:
            where.append("model_key=?")
            args.append(model_key)
        if kind is not None:
            where.append("kind=?")
            args.append(kind)
        sql = f"SELECT {self._COLS} FROM runs" + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY id DESC LIMIT ?"
        rows = self._run(lambda conn: conn.execute(sql, (*args, int(limit))).fetchall())
        return [self._row(r) for r in reversed(rows)]

    def models(self) -> list[tuple[str, str, int]]:
        """(model key, model name, number of runs) of every model with runs."""
        return self._run(lambda conn: [tuple(r) for r in conn.execute(
            "SELECT model_key, MAX(model_name), COUNT(*) FROM runs GROUP BY model_key ORDER BY MAX(updated) DESC")])

    def find(self, model_key: str, plan_sha: str, kind: str | None = None) -> Run | None:
        """The newest run of ``model_key`` with the plan ``plan_sha`` (of ``kind`` when given), or None."""
        sql = f"SELECT {self._COLS} FROM runs WHERE model_key=? AND plan_sha=?"
        args: tuple = (model_key, plan_sha)
        if kind is not None:
            sql, args = sql + " AND kind=?", (*args, kind)
        row = self._run(lambda conn: conn.execute(sql + " ORDER BY id DESC LIMIT 1", args).fetchone())
        return self._row(row) if row is not None else None

    def get(self, run_id: int) -> Run:
        """The run ``run_id``; RunStoreError when there is none."""
        rid = _run_id(run_id)
        row = self._run(lambda conn: conn.execute(f"SELECT {self._COLS} FROM runs WHERE id=?", (rid,)).fetchone())
        if row is None:
            raise RunStoreError(f"there is no run #{rid} in {self.path}",
                                "List the runs with `python -m pruneviz runs list`.")
        return self._row(row)

    def annotate(self, run_id: int, label: str | None = None, notes: str | None = None) -> Run:
        """Change a run's label and/or notes; returns the updated run."""
        run = self.get(run_id)
        self._run(lambda conn: conn.execute("UPDATE runs SET label=?, notes=? WHERE id=?",
                                            (run.label if label is None else label,
                                             run.notes if notes is None else notes, run.id)))
        return self.get(run.id)

    def delete(self, run_id: int) -> Run:
        """Remove the run ``run_id`` (a row pruneviz wrote; nothing else is touched) and return what it held."""
        run = self.get(run_id)
        self._run(lambda conn: conn.execute("DELETE FROM runs WHERE id=?", (run.id,)))
        return run

    def compare(self, run_ids: Iterable[int]) -> list[dict]:
        """One flat row per run (in the order given), for a side-by-side table: id, kind, time, label, the plan's
        summary and removed-unit counts, then every scalar metric (a metric a run lacks is None)."""
        runs = [self.get(r) for r in run_ids]
        keys: list[str] = []
        for run in runs:
            keys += [k for k, v in run.metrics.items() if _scalar(v) and k not in keys]
        rows = []
        for run in runs:
            row: dict[str, Any] = {"run": run.id, "kind": run.kind, "time": run.when, "label": run.label,
                                   "plan": run.summary()}
            row.update(_plan_counts(run))
            row.update({k: run.metrics.get(k) if _scalar(run.metrics.get(k)) else None for k in keys})
            rows.append(row)
        return rows


def _scalar(v) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def _plan_counts(run: Run) -> dict:
    if run.plan is None:
        return {}
    try:
        from .plan import Plan

        counts = Plan.from_dict(run.plan).counts()
    except PrunevizError:
        return {}
    return {f"removed {k}s": v for k, v in counts.items()}


def _run_id(run_id) -> int:
    try:
        rid = int(str(run_id).lstrip("#"))
    except (TypeError, ValueError):
        raise RunStoreError(f"{run_id!r} is not a run id (a whole number, as `runs list` shows)") from None
    if rid <= 0:
        raise RunStoreError(f"{run_id!r} is not a run id (a whole number, as `runs list` shows)")
    return rid


def _plan_parts(plan) -> tuple[dict | None, str | None]:
    """(plan dict, plan sha256) of a Plan, a plan dict or None (a dict is checked by reading it as a Plan)."""
    if plan is None:
        return None, None
    from .plan import Plan

    if isinstance(plan, Mapping):
        plan = Plan.from_dict(plan)
    if isinstance(plan, str):
        plan = Plan.from_json(plan)
    if not isinstance(plan, Plan):
        raise RunStoreError(f"a run's plan must be a Plan or its dict, not {type(plan).__name__}")
    return plan.to_dict(), plan.sha256()

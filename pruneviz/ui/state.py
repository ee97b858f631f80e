"""What the app remembers: one process-wide store shared by all browser sessions, and per-session state.

Process-wide (:class:`SharedStore`, held by ``st.cache_resource``) are only things that are safe to share:
base models (never mutated: plans are applied to copies or previewed through hook-carrying clones), importance
maps (stored as JSON-able dicts, each session gets fresh tensors), calibration windows, texts, and dense-model
perplexities. Everything a user changes lives in ``st.session_state``: the plan and its manual edits, the
session's importance maps, its physically pruned model, evaluation results, history, chat. So two sessions
pruning differently never see each other's plans.

``PRUNEVIZ_MODEL`` sets the default model source ("bundled" if unset); ``tiny`` is a random 4-layer LLaMA with
grouped-query attention and a character tokenizer from :mod:`pruneviz.testing`, for tests and quick demos.
"""
from __future__ import annotations

import copy
import json
import os
import pathlib
import re
import secrets
import shutil
import tempfile
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

import streamlit as st
import torch
from streamlit.runtime.scriptrunner import get_script_run_ctx

from ..data import calibration_windows, load_text_file, split_default, text_hash
from ..errors import PlanError, TextError
from ..evaluate import SweepPoint
from ..export import plan_of
from ..importance import Calibration, ImportanceMap
from ..loading import BUNDLED_HUB_ID, LoadedModel, is_local_model, load_model, load_offloaded
from ..plan import BaseIdentity, Plan
from ..progress import Progress
from ..surgery import masked_model
from ..testing import tiny_model, tiny_tokenizer
from .compat import ScriptControlException

ENV_MODEL = "PRUNEVIZ_MODEL"
ENV_EXPORTS = "PRUNEVIZ_EXPORT_DIR"
TINY = "tiny"
TINY_BASE_NAME = "tiny-llama"  # the name plans of the tiny model record (pruneviz.testing.tiny_model("llama"))
MAX_MODELS = 2  # base models kept in memory at once (least recently used is dropped)
MAX_UPLOAD_MB = 20  # also server.maxUploadSize in .streamlit/config.toml


# ---- models -------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSpec:
    """Which base model a session uses; ``key`` identifies it in the shared store.

    ``offload`` ("none", "disk" or "cpu") loads it with :func:`pruneviz.loading.load_offloaded`: decoder blocks
    beyond the first ``resident_layers`` stay on disk (or in CPU memory for a GPU) and are scored one at a time.
    """

    source: str = "bundled"
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False
    offload: str = "none"
    resident_layers: int = 0

    @property
    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @property
    def is_tiny(self) -> bool:
        return self.source.strip().lower() == TINY

    @property
    def is_offloaded(self) -> bool:
        return self.offload != "none"


def default_spec() -> ModelSpec:
    """The model a new session opens: ``$PRUNEVIZ_MODEL`` or the bundled SmolLM2-135M-Instruct."""
    return ModelSpec(source=os.environ.get(ENV_MODEL, "").strip() or "bundled")


class SharedStore:
    """Process-wide caches. Base models are read-only by contract; other entries are plain data."""

    def __init__(self):
        self.lock = threading.RLock()
        self.models: OrderedDict[str, Any] = OrderedDict()  # spec key -> LoadedModel
        self.model_locks: dict[str, threading.Lock] = {}
        self.imaps: OrderedDict[str, dict] = OrderedDict()  # imap key -> ImportanceMap.to_dict()
        self.windows: OrderedDict[str, torch.Tensor] = OrderedDict()  # calibration windows [N, T]
        self.texts: dict[str, str] = {}
        self.results: OrderedDict[str, dict] = OrderedDict()  # dense PPL, throughput, costs
        self.mailbox: dict[str, list[Callable]] = {}  # session id -> session-state updates for its next run
        self.busy: dict[str, str] = {}  # session id -> label of a job still finishing in a superseded run
        self.workspaces: dict[str, dict[str, Workspace]] = {}  # owner token -> session id -> its live state
        self.heirs: dict[str, str] = {}  # session id of a reloaded page -> the session that took its work

    def lock_for(self, key: str) -> threading.Lock:
        with self.lock:
            return self.model_locks.setdefault(key, threading.Lock())

    def remember(self, table: OrderedDict, key: str, value, limit: int) -> None:
        with self.lock:
            table[key] = value
            table.move_to_end(key)
            while len(table) > limit:
                table.popitem(last=False)


@st.cache_resource(show_spinner=False)
def shared() -> SharedStore:
    """The one store of this server process (``st.cache_resource`` makes it a singleton across sessions)."""
    return SharedStore()


def _load_tiny(spec: ModelSpec):
    t0 = time.perf_counter()
    model, tok = tiny_model("llama"), tiny_tokenizer()
    return LoadedModel(model, tok, TINY, "tiny random LLaMA (test model)", torch.device("cpu"), torch.float32,
                       time.perf_counter() - t0)


def _load_offloaded(spec: ModelSpec):
    """:func:`pruneviz.loading.load_offloaded` into an offload folder of its own, removed with the model."""
    folder = tempfile.mkdtemp(prefix="pruneviz-offload-")
    try:
        loaded = load_offloaded(spec.source, device=spec.device, dtype=spec.dtype, offload=spec.offload,
                                resident_layers=spec.resident_layers, offload_folder=folder,
                                trust_remote_code=spec.trust_remote_code)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    weakref.finalize(loaded.model, shutil.rmtree, folder, True)  # once no session or job holds the model
    return loaded


def load_base(spec: ModelSpec, progress: Progress | None = None):
    """The shared base model for ``spec`` (loaded once per process; concurrent sessions wait for one load).

    Returns a :class:`pruneviz.loading.LoadedModel`; raises :class:`pruneviz.errors.PrunevizError` subclasses.
    """
    store = shared()
    with store.lock_for(spec.key):
        hit = store.models.get(spec.key)
        if hit is not None:
            store.models.move_to_end(spec.key)
            return hit
        if spec.is_tiny:
            loaded = _load_tiny(spec)
        elif spec.is_offloaded:
            loaded = _load_offloaded(spec)
        else:
            loaded = load_model(spec.source, device=spec.device, dtype=spec.dtype,
                                trust_remote_code=spec.trust_remote_code, progress=progress)
        store.remember(store.models, spec.key, loaded, MAX_MODELS)
        return loaded


def is_loaded(spec: ModelSpec) -> bool:
    return spec.key in shared().models


# ---- typed records of what a session made -----------------------------------------------------------------------
#
# Frozen: a record is replaced (``dataclasses.replace``), never edited, so a queued update (see :func:`save`) or a
# table built from an older list can never see a half-changed one.

@dataclass(frozen=True)
class RecoveryRecord:
    """A LoRA recovery of the session's pruned model (:func:`pruneviz.recovery.recover`), run on a copy of it.

    ``record`` is the library's record of the run (settings, steps done, trainable parameters), ``tag`` its short
    name in tables, ``text`` the name of the training text."""

    model: Any
    losses: tuple[float, ...]
    record: dict
    tag: str
    cancelled: bool
    seconds: float
    text: str


@dataclass(frozen=True)
class PrunedRecord:
    """The session's physically smaller model, built from ``plan`` (sha ``sha``) in ``seconds``
    (for a solver: the solver run that made plan and model together), with its LoRA ``recovery`` once one ran."""

    sha: str
    model: Any
    plan: Plan
    seconds: float
    recovery: RecoveryRecord | None = None


@dataclass(frozen=True)
class EvalRecord:
    """Dense, pruned and (after LoRA recovery) pruned + LoRA perplexity of one plan under one protocol and text.

    ``complete`` is False for a cancelled evaluation (the numbers cover the windows done); ``how`` says which model
    stood for "pruned" (masked preview, physically pruned, + LoRA); ``lora`` is the recovery's tag."""

    sha: str
    summary: str
    text: str
    protocol: str
    protocol_text: str
    dense_ppl: float
    pruned_ppl: float
    tokens: int
    how: str
    complete: bool
    seconds: float
    params: int
    dense_params: int
    time: str
    lora_ppl: float | None = None
    lora: str | None = None


@dataclass(frozen=True)
class HistoryEntry:
    """A configuration that was tried: the plan (JSON), the slider settings and edits that made it (JSON text, to
    restore the Prune page), and the latest metrics measured on it."""

    sha: str
    summary: str
    criterion: str
    strategy: str
    plan_json: dict
    settings: str = "null"
    edits: str = "[]"
    n: int = 0
    time: str = ""
    params: int | None = None
    dense_ppl: float | None = None
    ppl: float | None = None
    lora_ppl: float | None = None
    protocol: str | None = None

    def updated(self, other: "HistoryEntry") -> "HistoryEntry":
        """This entry (its number and time) with every field ``other`` sets (not None) taken from ``other``."""
        keep = {"n", "time"}
        return replace(self, **{k: v for k, v in asdict_shallow(other).items() if v is not None and k not in keep})

    def row(self) -> dict:
        """The columns of the History table."""
        return {k: v for k, v in asdict_shallow(self).items() if k not in ("plan_json", "settings", "edits")}


@dataclass(frozen=True)
class Preview:
    """Loss of a model on the first tokens of a short text and its top next-token guesses (the Prune preview)."""

    ppl: float
    nll: tuple[float, ...]
    tokens: tuple[str, ...]
    next: tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class TokenDiff:
    """Per-token losses of the dense and the pruned model on one text, computed for the plan ``sha``."""

    tokens: tuple[str, ...]
    dense: tuple[float, ...]
    pruned: tuple[float, ...]
    sha: str


@dataclass(frozen=True)
class ExportRecord:
    """The last export: the plan's sha and the library's :class:`pruneviz.export.ExportReport`."""

    sha: str
    report: Any


def asdict_shallow(record) -> dict:
    """A record's fields as a dict, values as they are (``dataclasses.asdict`` would deep-copy models)."""
    return {f: getattr(record, f) for f in record.__dataclass_fields__}


# ---- per-session state --------------------------------------------------------------------------------------------

SESSION_DEFAULTS: dict[str, Any] = {
    "model_spec": None,  # ModelSpec of the session's base model
    "plan": None,  # Plan
    "plan_settings": None,  # dict: the slider settings that made the plan (None = solver / file / manual)
    "plan_origin": None,  # Plan set from elsewhere (solver, file, history) that the manual edits start from
    "prune_ui": None,  # dict: the Prune page's slider values (persist while the page is not shown)
    "prune_seen": None,  # slider values at the last Prune render (a change rebuilds the plan)
    "edits": [],  # manual edits (kind, layer, indices, remove) applied on top of the allocation
    "imaps": {},  # criterion name -> ImportanceMap
    "calib": None,  # Calibration last used
    "pruned": None,  # PrunedRecord: this session's physically smaller model (and its LoRA recovery)
    "masked": None,  # (plan sha, masked view)
    "preview": None,  # ((plan sha, text, model id), Preview of the plan's model)
    "history": [],  # [HistoryEntry]: configurations tried
    "chat": [],  # [{"prompt", "dense", "pruned", "dense_stats", "pruned_stats"}]
    "evals": [],  # [EvalRecord]
    "sweep": [],  # [pruneviz.evaluate.SweepPoint] of the text (text_sha256) and protocol they were measured on
    "tokdiff": None,  # TokenDiff: per-token losses of dense and pruned on one text
    "export": None,  # ExportRecord of the last export
    "cost_rates": {},  # criterion (or "lora") -> measured seconds per forward token of its last run here
    "notices": [],  # messages shown once on the next run
    "per_model": {},  # spec key -> {PER_MODEL_KEYS: values} of the models this session switched away from
}
PAGE_WIDGET_PREFIXES = ("imp_", "pr_", "ev_", "ex_", "_costs")
PER_MODEL_KEYS = ("plan", "plan_settings", "plan_origin", "prune_ui", "prune_seen", "edits", "imaps", "calib",
                  "pruned", "masked", "preview", "history", "chat", "evals", "sweep", "tokdiff", "export",
                  "cost_rates")
KEEP_PLAN = "keep"  # prune_seen when a plan came from elsewhere: the Prune page adopts its sliders, no rebuild


def init() -> None:
    """Give every session key its default (called once per run by ``app.py``)."""
    for key, value in SESSION_DEFAULTS.items():
        st.session_state.setdefault(key, copy.deepcopy(value))


def session_spec() -> ModelSpec:
    return st.session_state.get("model_spec") or default_spec()


def use_model(spec: ModelSpec) -> None:
    """Switch this session to ``spec``. The maps, plans, evaluations, history and chat of the model left are kept
    (per model, in this session) and come back when it is loaded again; a model never used starts empty."""
    ss = st.session_state
    old = ss.get("model_spec")
    if old is not None and old.key == spec.key:
        return
    kept = ss.setdefault("per_model", {})
    if old is not None:
        kept[old.key] = {key: ss.get(key) for key in PER_MODEL_KEYS}
        mine = kept[old.key]
        mine["masked"] = mine["preview"] = None  # views of a base that may leave memory: rebuilt when needed
    restored = kept.pop(spec.key, {})
    for key in PER_MODEL_KEYS:
        ss[key] = restored[key] if key in restored else copy.deepcopy(SESSION_DEFAULTS[key])
    for key in [k for k in st.session_state if str(k).startswith(PAGE_WIDGET_PREFIXES)]:
        del st.session_state[key]  # page widgets sized for the old model (layer ranges, block counts)
    st.session_state["model_spec"] = spec


def kept_work(spec: ModelSpec) -> str | None:
    """What this session keeps of ``spec`` while another model is loaded ("2 maps, 1 evaluation, ..."), or None."""
    rec = st.session_state.get("per_model", {}).get(spec.key)
    if not rec:
        return None
    counts = [(len(rec.get("imaps") or {}), "map"), (len(rec.get("history") or []), "configuration"),
              (len(rec.get("evals") or []), "evaluation"), (len(rec.get("chat") or []), "chat turn")]
    parts = [f"{n} {what}{'s' if n != 1 else ''}" for n, what in counts if n]
    if rec.get("plan") is not None and not rec["plan"].is_empty():
        parts.insert(0, "a plan")
    return ", ".join(parts) or None


def current():
    """The session's LoadedModel, or None if it has not been loaded (or was dropped from memory)."""
    spec = st.session_state.get("model_spec")
    if spec is None:
        return None
    return shared().models.get(spec.key)


def notify(message: str, icon: str = "ℹ️") -> None:
    """Show ``message`` once at the top of the next run (used after a cancelled job)."""
    save(lambda ss: ss.setdefault("notices", []).append((message, icon)))


# ---- results of superseded runs -------------------------------------------------------------------------------------
#
# When the user clicks anything while long work runs, Streamlit stops that run and starts a new one at once; the
# old run's thread finishes the current step (see work.Job) but may no longer touch ``st.session_state`` (every
# access raises Streamlit's stop exception). Its results go through :func:`save`: applied at once when possible,
# otherwise queued in the shared store and applied by :func:`drain` at the session's next run.

def session_id() -> str:
    ctx = get_script_run_ctx(suppress_warning=True)
    return ctx.session_id if ctx is not None else "bare"


def save(update: Callable[[Any], None]) -> None:
    """Apply ``update(st.session_state)`` now, or at the session's next run if this run was superseded."""
    try:
        update(st.session_state)
    except ScriptControlException:
        with shared().lock:
            shared().mailbox.setdefault(heir(session_id()), []).append(update)


def drain() -> int:
    """Apply the updates queued for this session by superseded runs; returns how many."""
    with shared().lock:
        updates = shared().mailbox.pop(session_id(), [])
    for update in updates:
        update(st.session_state)
    return len(updates)


def finishing_job() -> str | None:
    """Label of a job of this session that is still finishing in a superseded run, or in the session of the page
    before a reload (:func:`restore_work`); None if there is none."""
    store, me = shared(), session_id()
    with store.lock:
        return store.busy.get(me) or next((label for sid, label in store.busy.items() if heir(sid) == me), None)


# ---- sessions that are gone, pages that were reloaded ---------------------------------------------------------------
#
# A reload (or a closed tab) ends the browser session: Streamlit asks its script run to stop, and a new session
# starts with empty ``st.session_state``. Jobs notice through :func:`session_alive` (``work.Job.cancelled``) and stop
# after the current step; their last results are queued for the session that takes over. Every run registers its
# live session state under the page's owner token (``?owner=`` in the URL, which a reload keeps; the jobs panel uses
# the same token), and the first run of a new session with that token takes over the work of a session that is gone.

OWNER_PARAM = "owner"
OWNER_KEY = "job_owner"  # session key of the token (shared with pruneviz.ui.jobs_panel)
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
WORK_KEYS = tuple(k for k in SESSION_DEFAULTS if k != "notices") + ("fidelity", "zeroshot")
WORK_TTL = 10 * 60  # seconds a gone session's work (and the models it holds) waits for its page to come back
MAX_WORKSPACES = 32  # owner tokens remembered at once


@dataclass
class Workspace:
    """A session's live state (Streamlit's session state object, read when its page comes back) and when it last
    ran."""

    session_id: str
    state: Any
    seen: float


def session_alive(sid: str) -> bool:
    """False once the browser session ``sid`` has disconnected (its tab was closed or reloaded). True while it is
    connected, and outside a running Streamlit server (AppTest, scripts), where no session ends."""
    try:
        from streamlit import runtime

        if sid == "bare" or not runtime.exists():
            return True
        return bool(runtime.get_instance().is_active_session(sid))
    except Exception:  # noqa: BLE001 - a runtime layout we do not know: never cancel work because of it
        return True


def heir(sid: str) -> str:
    """The session that now holds the work of ``sid`` (``sid`` itself unless its page was reloaded)."""
    store = shared()
    for _ in range(64):  # a chain of reloads; bounded against a cycle
        nxt = store.heirs.get(sid)
        if nxt is None or nxt == sid:
            break
        sid = nxt
    return sid


def owner_token() -> str:
    """The page's owner token: the session's, else the URL's (a reloaded page), else a new one; kept in the URL."""
    ss = st.session_state
    tok = ss.get(OWNER_KEY)
    if not (isinstance(tok, str) and _TOKEN.match(tok)):
        given = st.query_params.get(OWNER_PARAM)
        tok = given if isinstance(given, str) and _TOKEN.match(given) else secrets.token_urlsafe(16)
        ss[OWNER_KEY] = tok
    if st.query_params.get(OWNER_PARAM) != tok:
        st.query_params[OWNER_PARAM] = tok
    return tok


def keep_work() -> None:
    """Register this session's live state under its owner token (every run), and forget the work of sessions that
    have been gone longer than :data:`WORK_TTL`."""
    ctx = get_script_run_ctx(suppress_warning=True)
    if ctx is None:
        return
    tok, sid, now, store = owner_token(), session_id(), time.time(), shared()
    with store.lock:
        store.workspaces.setdefault(tok, {})[sid] = Workspace(sid, ctx.session_state, now)
        for t, mine in list(store.workspaces.items()):
            for s, w in list(mine.items()):
                if now - w.seen > WORK_TTL and not session_alive(s):
                    del mine[s]
            if not mine:
                del store.workspaces[t]
        while len(store.workspaces) > MAX_WORKSPACES:
            oldest = min(store.workspaces, key=lambda t: max(w.seen for w in store.workspaces[t].values()))
            del store.workspaces[oldest]


def restore_work(wait: float = 1.0) -> str | None:
    """At the first run of a session: take over the work (maps, plan, built model, evaluations, history, chat, the
    model in use) of the most recent session of the same owner token that is gone (the page before a reload), and
    the results its jobs still queue. Returns what was restored ("1 map, a plan, ...") or None."""
    ss = st.session_state
    if ss.get("work_checked"):
        return None
    ss["work_checked"] = True
    tok, me, store = owner_token(), session_id(), shared()
    deadline = time.monotonic() + wait
    while True:  # the old page's disconnect may reach the server just after the new page's first run starts
        with store.lock:
            others = [w for s, w in store.workspaces.get(tok, {}).items() if s != me]
        gone = [w for w in others if not session_alive(w.session_id)]
        if gone or not others or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    if not gone:
        return None
    prev = max(gone, key=lambda w: w.seen)
    try:
        old = dict(prev.state.filtered_state)
    except Exception:  # noqa: BLE001 - a state Streamlit has torn down: nothing to take
        old = {}
    for key in WORK_KEYS:
        if old.get(key) is not None:
            value = old[key]
            ss[key] = copy.copy(value) if isinstance(value, (list, dict)) else value
    with store.lock:
        store.workspaces.get(tok, {}).pop(prev.session_id, None)
        store.heirs[prev.session_id] = me
        queued = store.mailbox.pop(prev.session_id, [])
        if queued:
            store.mailbox.setdefault(me, []).extend(queued)
    return work_summary(ss) if old else None


def work_summary(ss) -> str | None:
    """What a session holds, in words ("a plan, 2 maps, 1 evaluation"), or None when it holds nothing."""
    counts = [(len(ss.get("imaps") or {}), "map"), (len(ss.get("history") or []), "configuration"),
              (len(ss.get("evals") or []), "evaluation"), (len(ss.get("chat") or []), "chat turn")]
    parts = [f"{n} {what}{'s' if n != 1 else ''}" for n, what in counts if n]
    plan = ss.get("plan")
    if plan is not None and not plan.is_empty():
        parts.insert(0, "a plan" + (" and its built model" if ss.get("pruned") is not None else ""))
    return ", ".join(parts) or None


# ---- plan ---------------------------------------------------------------------------------------------------------

def base_identity(loaded) -> BaseIdentity:
    """The identity plans of this model carry (the same one :mod:`pruneviz.allocate` writes)."""
    return BaseIdentity.of(loaded.model)


def is_exported(loaded) -> bool:
    """True when the loaded model is an already pruned checkpoint (a pruneviz export): its layers have their own
    widths and its unit indices are not the dense base's, so it is explored through its base."""
    cfg = loaded.model.config
    return any(getattr(cfg, k, None) for k in ("pruneviz_base_geometry", "pruneviz_plan", "pruneviz_plan_sha256"))


def exported_plan(loaded) -> Plan | None:
    """The plan an exported checkpoint was pruned with (:func:`pruneviz.export.plan_of`), None for a dense model
    or an export that records none."""
    return plan_of(loaded.model) if is_exported(loaded) else None


def model_card(loaded, limit: int = 200_000) -> str | None:
    """The model card (README.md) of a model loaded from a folder, at most ``limit`` characters; None if absent."""
    path = getattr(loaded, "path", None)
    card = pathlib.Path(path) / "README.md" if path else None
    if card is None or not card.is_file():
        return None
    try:
        return card.read_text(encoding="utf-8", errors="replace")[:limit]
    except OSError:
        return None


def base_spec(plan: Plan, like: ModelSpec) -> ModelSpec | None:
    """A spec that loads the dense base ``plan`` was made for (``plan.base.name``), when it is loadable here: the
    bundled model, the tiny test model or a local folder (device and dtype as in ``like``); None otherwise."""
    name = plan.base.name.strip()
    if name == BUNDLED_HUB_ID:
        source = "bundled"
    elif name == TINY_BASE_NAME:
        source = TINY
    elif name and is_local_model(name):
        source = str(pathlib.Path(name).expanduser())
    else:
        return None
    return ModelSpec(source, like.device, like.dtype)


def get_plan(loaded) -> Plan:
    """The session's plan (an empty plan for the loaded model on first use). For an exported checkpoint
    (:func:`is_exported`): the plan it carries, which no page edits (new plans are made on its base)."""
    if is_exported(loaded):
        carried = exported_plan(loaded)
        if carried is None:
            raise PlanError("this checkpoint is already pruned but records no plan; load its dense base model to "
                            "make plans")
        return carried
    plan = st.session_state.get("plan")
    if plan is None or plan.geometry != base_identity(loaded).geometry:
        plan = Plan.empty(loaded.model)
        st.session_state["plan"] = plan
    return plan


SLIDER_PREFIX = "pr_"


def set_plan(plan: Plan, settings: dict | None = None, edits: list | None = None, ss=None) -> None:
    """Make ``plan`` the session's plan. ``settings`` (slider values) are restored into the Prune page's widgets,
    so that page shows how the plan was made and does not rebuild it; call outside the Prune page's widgets.
    ``ss`` is the session state to change (default ``st.session_state``; :func:`save` passes it).
    """
    ss = st.session_state if ss is None else ss
    ss["plan"] = plan
    ss["plan_settings"] = settings
    ss["edits"] = [tuple(e) for e in (edits or [])]
    ss["plan_origin"] = None if settings else plan  # "Clear" goes back to it (not to a plan from the sliders)
    if settings:
        ss["prune_ui"] = dict(settings)
        for k, v in settings.items():
            ss[SLIDER_PREFIX + k] = v
    ss["prune_seen"] = ss.get("prune_ui") if settings else KEEP_PLAN


def pruned_record(plan: Plan) -> PrunedRecord | None:
    """The session's :class:`PrunedRecord` if it was built from ``plan`` (else None)."""
    rec = st.session_state.get("pruned")
    return rec if rec is not None and rec.sha == plan.sha256() else None


def pruned_for(plan: Plan):
    """The session's physically pruned model if it was built from ``plan`` (else None)."""
    rec = pruned_record(plan)
    return rec.model if rec is not None else None


def recovery_for(plan: Plan) -> RecoveryRecord | None:
    """The LoRA recovery of the session's pruned model for ``plan`` (see :func:`pruneviz.ui.background.start_recovery`),
    or None if there is none."""
    rec = pruned_record(plan)
    return rec.recovery if rec is not None else None


def built_for(plan: Plan):
    """The model chat, evaluation and export use for ``plan``: the LoRA-recovered one when recovery ran, else the
    physically pruned one (None if neither was built). The pruned model itself is kept unchanged."""
    recovery = recovery_for(plan)
    return recovery.model if recovery else pruned_for(plan)


def evals_for(plan: Plan, complete_only: bool = False) -> list[EvalRecord]:
    """The session's evaluations of ``plan``, oldest first (only finished ones with ``complete_only``)."""
    sha = plan.sha256()
    return [e for e in st.session_state.get("evals", []) if e.sha == sha and (e.complete or not complete_only)]


def latest_eval(plan: Plan, complete_only: bool = False) -> EvalRecord | None:
    """The session's most recent evaluation of ``plan`` (None if there is none)."""
    mine = evals_for(plan, complete_only)
    return mine[-1] if mine else None


def export_for(plan: Plan) -> ExportRecord | None:
    """The session's last export if it was of ``plan``."""
    rec = st.session_state.get("export")
    return rec if rec is not None and rec.sha == plan.sha256() else None


def sweep_points(protocol: str, text: str | None) -> list[SweepPoint]:
    """The session's sweep points measured under ``protocol`` on ``text`` (any text when None)."""
    sha = text_hash(text) if text is not None else None
    return [p for p in st.session_state.get("sweep", []) if p.protocol == protocol
            and (sha is None or p.text_sha256 == sha)]


def masked_for(loaded, plan: Plan):
    """A masked preview of ``plan`` on the shared base (shares tensors; hooks live on the clone only)."""
    sha = plan.sha256()
    rec = st.session_state.get("masked")
    if rec and rec[0] == sha:
        return rec[1]
    view = masked_model(loaded.model, plan)
    st.session_state["masked"] = (sha, view)
    return view


def compare_model(loaded, plan: Plan, lora: bool = True) -> tuple[Any, str]:
    """The model standing for "pruned" in chat and evaluation, and how it was made. With ``lora`` (default) the
    LoRA-recovered model when there is one; ``lora=False`` gives the model before recovery."""
    if is_exported(loaded):
        return loaded.model, "the exported model itself"
    if plan.is_empty():
        return loaded.model, "dense (the plan is empty)"
    recovery = recovery_for(plan) if lora else None
    if recovery is not None:
        return recovery.model, f"physically pruned + LoRA recovery ({recovery.tag})"
    physical = pruned_for(plan)
    if physical is not None:
        return physical, "physically pruned"
    return masked_for(loaded, plan), "masked preview (apply the plan on the Prune page for the real thing)"


def add_history(entry: HistoryEntry, ss=None) -> None:
    """Record a configuration that was tried (plan JSON, settings, metrics); the same plan updates its entry.
    Each :data:`HISTORY_SINKS` function gets the new or updated entry (the run store: :mod:`pruneviz.ui.persist`)."""
    ss = st.session_state if ss is None else ss
    hist = ss.setdefault("history", [])
    for i, old in enumerate(hist):
        if old.sha == entry.sha:
            hist[i] = old.updated(entry)
            break
    else:
        hist.append(replace(entry, n=len(hist) + 1, time=time.strftime("%H:%M:%S")))
        i = len(hist) - 1
    for sink in HISTORY_SINKS:
        sink(hist[i], ss)


HISTORY_SINKS: list[Callable[[HistoryEntry, Any], None]] = []  # filled by pruneviz.ui.persist when imported


# ---- importance maps, texts, calibration --------------------------------------------------------------------------

def imap_key(spec: ModelSpec, name: str, options, calib_desc: dict | None) -> str:
    opts = asdict(options) if options is not None and hasattr(options, "__dataclass_fields__") else {}
    return json.dumps({"model": spec.key, "criterion": name, "options": opts, "calib": calib_desc},
                      sort_keys=True, default=str)


def cached_imap(key: str):
    d = shared().imaps.get(key)
    return None if d is None else ImportanceMap.from_dict(copy.deepcopy(d))


def store_imap(key: str, imap) -> None:
    shared().remember(shared().imaps, key, imap.to_dict(), 64)


def default_texts() -> tuple[str, str]:
    """The bundled (calibration, evaluation) texts, split once per process."""
    store = shared()
    if "default_calib" not in store.texts:
        calib, evals = split_default()
        store.texts.update(default_calib=calib, default_eval=evals)
    return store.texts["default_calib"], store.texts["default_eval"]


def calibration(spec: ModelSpec, tokenizer, text_name: str, text: str, n: int, seq_len: int, seed: int):
    """Calibration windows for the session's model (tokenised once per process per setting)."""
    sha = text_hash(text, 64)
    key = json.dumps([spec.key, sha, n, seq_len, seed])
    tokens = shared().windows.get(key)
    if tokens is None:
        tokens = calibration_windows(tokenizer, text, n, seq_len, seed)  # [N, T]
        shared().remember(shared().windows, key, tokens, 16)
    return Calibration(tokens.clone(), text_name, sha, seed)


def read_upload(uploaded, max_mb: int = MAX_UPLOAD_MB) -> str:
    """Text of an uploaded file, with the size limit and the checks of :func:`pruneviz.data.load_text_file`."""
    size = getattr(uploaded, "size", None) or len(uploaded.getvalue())
    if size > max_mb * 1_000_000:
        raise TextError(f"{uploaded.name} is {size / 1e6:.1f} MB; the limit is {max_mb} MB. Upload an excerpt.")
    with tempfile.TemporaryDirectory() as td:
        path = pathlib.Path(td) / (pathlib.Path(uploaded.name).name or "upload.txt")
        path.write_bytes(uploaded.getvalue())
        return load_text_file(path, max_bytes=max_mb * 1_000_000)


def cached_result(key: str):
    return shared().results.get(key)


def store_result(key: str, value) -> None:
    shared().remember(shared().results, key, value, 256)


def exports_root() -> pathlib.Path:
    """Where checkpoints are written: ``$PRUNEVIZ_EXPORT_DIR`` or ``./exports``."""
    return pathlib.Path(os.environ.get(ENV_EXPORTS, "") or "exports").expanduser().resolve()

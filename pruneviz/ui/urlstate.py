"""Shareable URL state: ``?page=…&model=…&plan=…`` (and the jobs panel's ``owner``) in ``st.query_params``.

- ``model``: the sidebar's source (``bundled``, ``tiny``, a Hugging Face id, a local folder or GGUF file). Opening a
  URL loads the bundled model, the tiny test model, a model already in memory or a local model (a folder with a
  ``config.json``, a GGUF export folder or a ``.gguf`` file) at once; a Hub id is only filled into the picker
  (loading it may download gigabytes: press **Load model**). A URL never turns on ``trust_remote_code`` and never
  chooses offloading, device or dtype.
- ``plan``: the id of a stored run (:mod:`pruneviz.runs`); its plan becomes the session's plan once the model is
  loaded, after validation against it (a plan for another model is refused with a message).
- ``page``: the page's title in lower case (``evaluate``); an URL opened at the app's root goes there.

The app keeps the parameters current on every run, so the address bar always shares the present state.
"""
from __future__ import annotations

import json
import pathlib
import re

import streamlit as st

from ..errors import PrunevizError
from ..loading import is_local_model
from ..runs import plan_of_run
from . import persist, state

MODEL, PLAN, PAGE = "model", "plan", "page"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


def spec_from_url(source: str) -> tuple[state.ModelSpec | None, str, bool]:
    """(spec, picker source kind, load at once?) for a ``model`` parameter; spec None when it is unusable."""
    source = (source or "").strip()
    if source in ("bundled", "default"):
        return state.ModelSpec("bundled"), "bundled", True
    if source.lower() == state.TINY:
        return state.ModelSpec(state.TINY), "tiny", True
    if not source or len(source) > 1000 or "\x00" in source:
        return None, "", False
    path = pathlib.Path(source).expanduser()
    if path.is_absolute() or source.startswith(("~", ".")):
        ok = is_local_model(path)
        return (state.ModelSpec(str(path)), "folder", True) if ok else (None, "", False)
    if _HUB_ID.match(source):
        spec = state.ModelSpec(source)
        return spec, "hub", state.is_loaded(spec)
    return None, "", False


def url_source(spec: state.ModelSpec) -> str:
    return "tiny" if spec.is_tiny else spec.source


def start() -> state.ModelSpec | None:
    """At the first run of a session: read the URL, seed the model picker and remember the plan to load; returns
    the model to load now (also on later runs until it is loaded, see :func:`finish`)."""
    ss = st.session_state
    if not ss.get("url_read"):
        ss["url_read"] = True
        qp = st.query_params
        if qp.get(PLAN):
            ss["url_plan"] = qp.get(PLAN)
        if qp.get(PAGE):
            ss["url_page"] = qp.get(PAGE)
        given = qp.get(MODEL)
        if given:
            spec, kind, auto = spec_from_url(given)
            if spec is None:
                state.notify(f"The link names a model this app does not open by itself ({given[:80]}); pick one in "
                             "the sidebar.", "⚠️")
            elif spec.key != state.session_spec().key or state.current() is None:
                for k in ("model_source", "model_folder", "model_hub_id"):
                    ss.pop(k, None)
                ss["model_source"] = kind
                if kind in ("folder", "hub"):
                    ss["model_folder" if kind == "folder" else "model_hub_id"] = spec.source
                if auto:
                    ss["url_request"] = spec
                else:
                    state.notify(f"The link names {spec.source}: press **Load model** in the sidebar to load it.",
                                 "ℹ️")
    return ss.get("url_request")


def finish(loaded) -> None:
    """After the frame loaded the model: register it with the run store, restore its persisted history, load the
    URL's plan (once) and write the present state into the URL."""
    ss = st.session_state
    ss.pop("url_request", None)  # tried once: loaded, or its load failed (the message is shown)
    if loaded is None:
        return
    try:
        persist.register(state.session_spec(), loaded)
    except PrunevizError:
        return
    persist.restore(ss)
    wanted = ss.pop("url_plan", None)
    if wanted:
        load_run_plan(loaded, wanted, from_link=True)
    write(loaded)


def load_run_plan(loaded, run_id, notify: bool = True, from_link: bool = False) -> bool:
    """Make the plan of the stored run ``run_id`` the session's plan (validated against ``loaded``); a warning
    saying why when it does not fit or does not exist (``from_link``: as a notice, the link's page stays clean).
    True when loaded."""
    try:
        run = persist.store().get(run_id)
        plan = plan_of_run(run, loaded.model)
    except PrunevizError as e:
        text = f"Could not load the plan of run {run_id}{' from the link' if from_link else ''}: {e}"
        if from_link:
            state.notify(text, "⚠️")
        else:
            st.warning(text, icon=":material/warning:")
        return False
    settings = _json(run.extra.get("settings"), None)
    edits = _json(run.extra.get("edits"), [])
    state.set_plan(plan, settings if isinstance(settings, dict) else None,
                   [tuple(e) for e in edits] if isinstance(edits, list) else [])
    if notify:
        state.notify(f"Loaded the plan of run #{run.id}: {run.summary()}.", "✅")
    return True


def _json(text, default):
    try:
        return json.loads(text) if isinstance(text, str) else default
    except ValueError:
        return default


def write(loaded) -> None:
    """Put the session's model and (stored) plan into the URL; only what changed is sent."""
    ss = st.session_state
    qp = st.query_params
    want = {MODEL: url_source(state.session_spec())}
    plan = ss.get("plan")
    run_id = persist.plan_run_id(ss, plan) if plan is not None and not state.is_exported(loaded) else None
    for k, v in want.items():
        if qp.get(k) != v:
            qp[k] = v
    if run_id is not None:
        if qp.get(PLAN) != str(run_id):
            qp[PLAN] = str(run_id)
    elif PLAN in qp and not ss.get("url_plan"):
        del qp[PLAN]


def page_name(page) -> str:
    return str(getattr(page, "title", "") or "").strip().lower()


def follow_page(page, pages: list) -> None:
    """In app.py after ``st.navigation``: go to the URL's page once (an URL opened at the root), and keep the
    present page in the URL."""
    wanted = st.session_state.pop("url_page", None)
    here = page_name(page)
    if wanted and wanted.lower() != here:
        target = next((p for p in pages if page_name(p) == wanted.lower()), None)
        if target is not None:
            st.switch_page(target, query_params=st.query_params.to_dict())
    if st.query_params.get(PAGE) != here:
        st.query_params[PAGE] = here


def share_query(loaded) -> str:
    """The query string that opens the present page, model and plan (the jobs owner is left out: it is yours)."""
    from urllib.parse import urlencode

    qp = {k: v for k, v in st.query_params.to_dict().items() if k in (PAGE, MODEL, PLAN)}
    return "?" + urlencode(qp)

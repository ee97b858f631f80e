"""pruneviz app entrypoint: the frame (page setup, sidebar model picker, model loading) and navigation.

Run with ``make app`` (or ``streamlit run app.py``). ``PRUNEVIZ_MODEL`` picks the model a new session opens
("bundled" by default, "tiny" for a random test model). Widgets here stay stateful on every page; the pages in
``pages/`` only compose widgets and call :mod:`pruneviz`. The threading policy (:mod:`pruneviz.threads`) is set
first, before anything imports torch.
"""
from pruneviz.threads import apply_env, configure

apply_env()

import streamlit as st  # noqa: E402

from pruneviz.ui import components, urlstate  # noqa: E402
from pruneviz.ui.work import ScriptControlException, show_error  # noqa: E402

configure()

PAGES = [
    st.Page("pages/model.py", title="Model", icon=":material/memory:", default=True),
    st.Page("pages/importance.py", title="Importance", icon=":material/grid_on:"),
    st.Page("pages/prune.py", title="Prune", icon=":material/content_cut:"),
    st.Page("pages/chat.py", title="Chat", icon=":material/forum:"),
    st.Page("pages/evaluate.py", title="Evaluate", icon=":material/speed:"),
    st.Page("pages/inspect.py", title="Inspect", icon=":material/biotech:"),
    st.Page("pages/export.py", title="Export", icon=":material/ios_share:"),
    st.Page("pages/runs.py", title="Runs", icon=":material/history:"),
]

requested = components.frame_start()
page = st.navigation(PAGES, position="top")
urlstate.follow_page(page, PAGES)  # a shared link's page; the present page into the URL
components.frame_model(requested)
try:
    page.run()
except ScriptControlException:
    raise
except Exception as e:  # noqa: BLE001 - a bug in a page must not show a traceback
    show_error(e)
